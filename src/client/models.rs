//! `relayfarm models`: what the cluster can serve.

use std::process::ExitCode;

use relayfarm_proto::v1::{ListModelsRequest, ModelInfo};

use super::{connect, status_error, CoordinatorArgs};

/// `relayfarm models`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelsArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// The "sizes" column: default size and the accepted range.
pub fn sizes_cell(m: &ModelInfo) -> String {
    match &m.size {
        None => "?".to_string(),
        Some(s) => {
            let mut cell = format!(
                "default {}x{}, sides {}..={}",
                s.default_width, s.default_height, s.min_side, s.max_side
            );
            if s.multiple > 1 {
                if s.resolution_binning {
                    cell.push_str(&format!(" (binned; x{} without binning)", s.multiple));
                } else {
                    cell.push_str(&format!(", multiple of {}", s.multiple));
                }
            }
            if s.max_area > 0 {
                cell.push_str(&format!(", area <= {}", s.max_area));
            }
            cell
        }
    }
}

/// The "defaults" column.
pub fn defaults_cell(m: &ModelInfo) -> String {
    let mut cell = format!(
        "{} steps (max {}), guidance {}",
        m.default_steps, m.max_steps, m.default_guidance
    );
    if !m.scheduler.is_empty() {
        cell.push_str(&format!(", {}", m.scheduler));
    }
    cell
}

/// Formats rows as a left-aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Runs `relayfarm models`.
pub fn run(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async move {
        let url = args.coordinator.coordinator.clone();
        let mut client = connect(&url)?;
        let models = client
            .list_models(ListModelsRequest {})
            .await
            .map_err(|s| status_error(&url, "list models", &s))?
            .into_inner()
            .models;
        if models.is_empty() {
            eprintln!("no models: no worker has registered with the coordinator at {url} yet");
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = models
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.family.clone(),
                    sizes_cell(m),
                    defaults_cell(m),
                    m.workers.to_string(),
                ]
            })
            .collect();
        print!(
            "{}",
            table(&["NAME", "FAMILY", "SIZES", "DEFAULTS", "WORKERS"], &rows)
        );
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use relayfarm_proto::v1::SizeRules;

    #[test]
    fn model_cells_and_table() {
        let m = ModelInfo {
            name: "tiny".into(),
            family: "pixart-sigma".into(),
            size: Some(SizeRules {
                min_side: 1,
                max_side: 8192,
                multiple: 16,
                max_area: 0,
                default_height: 32,
                default_width: 32,
                resolution_binning: true,
            }),
            default_steps: 20,
            default_guidance: 4.5,
            max_steps: 1000,
            workers: 2,
            scheduler: "DPMSolverMultistepScheduler".into(),
            ..Default::default()
        };
        assert_eq!(
            sizes_cell(&m),
            "default 32x32, sides 1..=8192 (binned; x16 without binning)"
        );
        assert_eq!(
            defaults_cell(&m),
            "20 steps (max 1000), guidance 4.5, DPMSolverMultistepScheduler"
        );
        let t = table(&["A", "B"], &[vec!["long-name".into(), "x".into()]]);
        assert_eq!(t, "A          B\nlong-name  x\n");
    }
}
