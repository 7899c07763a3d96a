//! Parse, don't validate: a submitted batch header and its prompt items become a
//! [`ValidatedBatch`] of fully resolved jobs exactly once, or a list of errors, each naming its
//! field (`header.model`, `header.defaults.steps`, `prompts[3].height`, ...) and the rule broken.
//!
//! Rules come from the `ModelInfo` the workers registered (size rules, step limit) plus fixed
//! limits below. The model's defaults fill every unset parameter, and seeds are resolved here
//! (item seed, else batch seed + index, else a random base + index) so that a redelivered job
//! renders the identical image.

use relayfarm_proto::v1::{BatchHeader, ModelInfo, PromptItem, RenderParams, SizeRules};
use std::collections::BTreeMap;

/// Longest accepted prompt or negative prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
/// Longest accepted output name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;
/// Longest accepted label or idempotency key, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;
/// Most prompts in one batch.
pub const MAX_PROMPTS: usize = 1_000_000;
/// Largest accepted guidance scale.
pub const MAX_GUIDANCE: f64 = 100.0;
/// At most this many errors are listed in one message.
const MAX_LISTED_ERRORS: usize = 10;

/// One validation failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, e.g. `prompts[3].height`.
    pub field: String,
    /// The rule broken, e.g. `50 is not a multiple of 16`.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All the errors of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl std::fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().take(MAX_LISTED_ERRORS).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        if self.0.len() > MAX_LISTED_ERRORS {
            write!(
                f,
                "; (and {} more errors)",
                self.0.len() - MAX_LISTED_ERRORS
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl From<ValidationErrors> for crate::error::CoordError {
    fn from(e: ValidationErrors) -> Self {
        crate::error::CoordError::Invalid(e.to_string())
    }
}

/// A job with every parameter resolved: what a worker renders.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedJob {
    /// Position in the batch.
    pub index: u32,
    /// The prompt (non-empty).
    pub prompt: String,
    /// Output name stem ("" = none).
    pub name: String,
    /// Negative prompt ("" = none).
    pub negative_prompt: String,
    /// Height in pixels.
    pub height: u32,
    /// Width in pixels.
    pub width: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance: f64,
    /// Noise seed.
    pub seed: u64,
}

/// A batch that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedBatch {
    /// Model name (registered).
    pub model: String,
    /// Label ("" = none).
    pub label: String,
    /// Idempotency key ("" = none).
    pub idempotency_key: String,
    /// Render at exactly height × width.
    pub no_resolution_binning: bool,
    /// The jobs, in submission order.
    pub jobs: Vec<ResolvedJob>,
}

/// The effective rules of a model (zeros in the registered info replaced by sane values).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rules {
    min_side: u32,
    max_side: u32,
    multiple: u32,
    max_area: u64,
    default_height: u32,
    default_width: u32,
    binning: bool,
    default_steps: u32,
    default_guidance: f64,
    max_steps: u32,
}

impl Rules {
    fn of(info: &ModelInfo, no_binning: bool) -> Rules {
        let size = info.size.unwrap_or(SizeRules {
            min_side: 0,
            max_side: 0,
            multiple: 0,
            max_area: 0,
            default_height: 0,
            default_width: 0,
            resolution_binning: false,
        });
        let multiple = size.multiple.max(1);
        let max_side = if size.max_side == 0 {
            8192
        } else {
            size.max_side
        };
        let default_side = |d: u32| if d == 0 { 512.min(max_side) } else { d };
        Rules {
            min_side: size.min_side.max(1),
            max_side,
            multiple,
            max_area: size.max_area,
            default_height: default_side(size.default_height),
            default_width: default_side(size.default_width),
            binning: size.resolution_binning && !no_binning,
            default_steps: if info.default_steps == 0 {
                20
            } else {
                info.default_steps
            },
            default_guidance: if info.default_guidance.is_finite() && info.default_guidance > 0.0 {
                info.default_guidance
            } else {
                4.5
            },
            max_steps: if info.max_steps == 0 {
                1000
            } else {
                info.max_steps
            },
        }
    }
}

/// Collects errors while checking.
struct Checker<'a> {
    rules: Rules,
    model: &'a str,
    errors: Vec<FieldError>,
}

impl Checker<'_> {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn side(&mut self, field: String, v: u32) {
        let r = self.rules;
        if v < r.min_side || v > r.max_side {
            self.err(
                field,
                format!(
                    "{v} is outside [{}, {}] for model `{}`",
                    r.min_side, r.max_side, self.model
                ),
            );
        } else if !r.binning && v.checked_rem(r.multiple).unwrap_or(0) != 0 {
            self.err(
                field,
                format!(
                    "{v} is not a multiple of {} (model `{}` without resolution binning)",
                    r.multiple, self.model
                ),
            );
        } else if !r.binning && v < r.multiple {
            self.err(field, format!("{v} is smaller than {}", r.multiple));
        }
    }

    /// Checks the fields set in `p` (prefix e.g. `prompts[3]` or `header.defaults`).
    fn params(&mut self, prefix: &str, p: &RenderParams) {
        if let Some(h) = p.height {
            self.side(format!("{prefix}.height"), h);
        }
        if let Some(w) = p.width {
            self.side(format!("{prefix}.width"), w);
        }
        if let Some(s) = p.steps {
            if s == 0 || s > self.rules.max_steps {
                let max = self.rules.max_steps;
                self.err(
                    format!("{prefix}.steps"),
                    format!("{s} is outside [1, {max}]"),
                );
            }
        }
        if let Some(g) = p.guidance {
            if !g.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&g) {
                self.err(
                    format!("{prefix}.guidance"),
                    format!("{g} is not a finite number in [0, {MAX_GUIDANCE}]"),
                );
            }
        }
        if let Some(n) = &p.negative_prompt {
            if n.len() > MAX_PROMPT_BYTES {
                self.err(
                    format!("{prefix}.negative_prompt"),
                    format!("{} bytes is longer than {MAX_PROMPT_BYTES}", n.len()),
                );
            }
        }
    }
}

/// Whether an output name is safe as a file stem.
fn name_problem(name: &str) -> Option<String> {
    if name.len() > MAX_NAME_BYTES {
        return Some(format!(
            "{} bytes is longer than {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if name == "." || name == ".." || name.starts_with('.') {
        return Some(format!("{name:?} may not start with a dot"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Some(format!(
            "{name:?} contains a path separator or control character"
        ));
    }
    None
}

/// Validates a batch against the registered models and resolves every job.
///
/// `seed_base` is used for prompts without a seed when the batch has none either
/// (pass a random number).
pub fn validate_batch(
    header: &BatchHeader,
    items: &[PromptItem],
    models: &BTreeMap<String, ModelInfo>,
    seed_base: u64,
) -> Result<ValidatedBatch, ValidationErrors> {
    let served: Vec<&str> = models.keys().map(String::as_str).collect();
    let info = if header.model.trim().is_empty() {
        None
    } else {
        models.get(&header.model)
    };
    let Some(info) = info else {
        let what = if header.model.trim().is_empty() {
            "required".to_string()
        } else {
            format!("unknown model `{}`", header.model)
        };
        let hint = if served.is_empty() {
            " (no worker has registered a model yet)"
        } else {
            ""
        };
        return Err(ValidationErrors(vec![FieldError {
            field: "header.model".into(),
            message: format!("{what}; served: [{}]{hint}", served.join(", ")),
        }]));
    };
    let rules = Rules::of(info, header.no_resolution_binning);
    let mut c = Checker {
        rules,
        model: &header.model,
        errors: Vec::new(),
    };
    let defaults = header.defaults.clone().unwrap_or_default();
    c.params("header.defaults", &defaults);
    if header.label.len() > MAX_LABEL_BYTES {
        c.err(
            "header.label",
            format!("longer than {MAX_LABEL_BYTES} bytes"),
        );
    }
    if header.idempotency_key.len() > MAX_LABEL_BYTES {
        c.err(
            "header.idempotency_key",
            format!("longer than {MAX_LABEL_BYTES} bytes"),
        );
    }
    if items.is_empty() {
        c.err("prompts", "the batch has no prompts");
    }
    if items.len() > MAX_PROMPTS {
        c.err(
            "prompts",
            format!("{} prompts is more than {MAX_PROMPTS}", items.len()),
        );
    }
    let mut jobs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("prompts[{i}]");
        if item.prompt.trim().is_empty() {
            c.err(format!("{prefix}.prompt"), "empty");
        } else if item.prompt.len() > MAX_PROMPT_BYTES {
            c.err(
                format!("{prefix}.prompt"),
                format!(
                    "{} bytes is longer than {MAX_PROMPT_BYTES}",
                    item.prompt.len()
                ),
            );
        }
        if let Some(p) = name_problem(&item.name).filter(|_| !item.name.is_empty()) {
            c.err(format!("{prefix}.name"), p);
        }
        let own = item.params.clone().unwrap_or_default();
        let errors_before = c.errors.len();
        c.params(&prefix, &own);
        let index = i as u32;
        let height = own
            .height
            .or(defaults.height)
            .unwrap_or(rules.default_height);
        let width = own.width.or(defaults.width).unwrap_or(rules.default_width);
        if c.errors.len() == errors_before
            && rules.max_area > 0
            && u64::from(height) * u64::from(width) > rules.max_area
        {
            c.err(
                prefix.clone(),
                format!(
                    "{height}×{width} is larger than the model's area cap of {} pixels",
                    rules.max_area
                ),
            );
        }
        if !c.errors.is_empty() {
            // Keep checking (to report every error) but stop building jobs.
            continue;
        }
        let seed = own.seed.unwrap_or_else(|| {
            defaults
                .seed
                .unwrap_or(seed_base)
                .wrapping_add(u64::from(index))
        });
        jobs.push(ResolvedJob {
            index,
            prompt: item.prompt.clone(),
            name: item.name.clone(),
            negative_prompt: own
                .negative_prompt
                .or_else(|| defaults.negative_prompt.clone())
                .unwrap_or_default(),
            height,
            width,
            steps: own.steps.or(defaults.steps).unwrap_or(rules.default_steps),
            guidance: own
                .guidance
                .or(defaults.guidance)
                .unwrap_or(rules.default_guidance),
            seed,
        });
    }
    if !c.errors.is_empty() {
        return Err(ValidationErrors(c.errors));
    }
    Ok(ValidatedBatch {
        model: header.model.clone(),
        label: header.label.clone(),
        idempotency_key: header.idempotency_key.clone(),
        no_resolution_binning: header.no_resolution_binning,
        jobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> BTreeMap<String, ModelInfo> {
        let info = ModelInfo {
            name: "tiny".into(),
            family: "pixart-sigma".into(),
            pipeline_class: "PixArtSigmaPipeline".into(),
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
            workers: 0,
            scheduler: "dpm".into(),
        };
        let mut capped = info.clone();
        capped.name = "capped".into();
        if let Some(s) = capped.size.as_mut() {
            s.max_area = 1024 * 1024;
        }
        BTreeMap::from([("tiny".to_string(), info), ("capped".to_string(), capped)])
    }

    fn header(model: &str) -> BatchHeader {
        BatchHeader {
            model: model.into(),
            ..Default::default()
        }
    }

    fn item(prompt: &str) -> PromptItem {
        PromptItem {
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    fn with(prompt: &str, p: RenderParams) -> PromptItem {
        PromptItem {
            prompt: prompt.into(),
            params: Some(p),
            name: String::new(),
        }
    }

    /// Validates and returns the error message (panics if it passed).
    fn fails(h: &BatchHeader, items: &[PromptItem]) -> String {
        match validate_batch(h, items, &models(), 7) {
            Ok(b) => panic!("expected an error, got {b:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn resolves_defaults_and_seeds() {
        let mut h = header("tiny");
        h.defaults = Some(RenderParams {
            steps: Some(3),
            seed: Some(100),
            ..Default::default()
        });
        let items = vec![
            item("a cat"),
            with(
                "a dog",
                RenderParams {
                    seed: Some(5),
                    height: Some(48),
                    guidance: Some(1.0),
                    ..Default::default()
                },
            ),
        ];
        let b = validate_batch(&h, &items, &models(), 7).unwrap();
        assert_eq!(b.jobs.len(), 2);
        assert_eq!(b.jobs[0].seed, 100);
        assert_eq!(b.jobs[0].steps, 3);
        assert_eq!((b.jobs[0].height, b.jobs[0].width), (32, 32));
        assert_eq!(b.jobs[0].guidance, 4.5);
        assert_eq!(b.jobs[1].seed, 5);
        assert_eq!(b.jobs[1].height, 48);
        assert_eq!(b.jobs[1].guidance, 1.0);
        // No seed anywhere: the random base + index.
        let b = validate_batch(&header("tiny"), &[item("x"), item("y")], &models(), 7).unwrap();
        assert_eq!((b.jobs[0].seed, b.jobs[1].seed), (7, 8));
        // Binning on: any side in range is fine.
        let b = validate_batch(
            &header("tiny"),
            &[with(
                "x",
                RenderParams {
                    height: Some(50),
                    ..Default::default()
                },
            )],
            &models(),
            7,
        );
        assert!(b.is_ok());
    }

    #[test]
    fn unknown_and_missing_model() {
        let m = fails(&header("nope"), &[item("x")]);
        assert!(
            m.starts_with("header.model: unknown model `nope`; served: [capped, tiny]"),
            "{m}"
        );
        let m = fails(&header(""), &[item("x")]);
        assert!(m.starts_with("header.model: required"), "{m}");
        let e = validate_batch(&header("x"), &[item("x")], &BTreeMap::new(), 0).unwrap_err();
        assert!(e.to_string().contains("no worker has registered"), "{e}");
    }

    #[test]
    fn empty_prompt_and_empty_batch() {
        let m = fails(&header("tiny"), &[item("ok"), item("   ")]);
        assert_eq!(m, "prompts[1].prompt: empty");
        let m = fails(&header("tiny"), &[]);
        assert_eq!(m, "prompts: the batch has no prompts");
        let long = "x".repeat(MAX_PROMPT_BYTES + 1);
        assert!(fails(&header("tiny"), &[item(&long)]).starts_with("prompts[0].prompt: "));
    }

    #[test]
    fn sizes() {
        let mut h = header("tiny");
        h.no_resolution_binning = true;
        let m = fails(
            &h,
            &[
                item("a"),
                item("b"),
                item("c"),
                with(
                    "d",
                    RenderParams {
                        height: Some(50),
                        ..Default::default()
                    },
                ),
            ],
        );
        assert_eq!(
            m,
            "prompts[3].height: 50 is not a multiple of 16 (model `tiny` without resolution binning)"
        );
        let m = fails(
            &header("tiny"),
            &[with(
                "d",
                RenderParams {
                    width: Some(0),
                    ..Default::default()
                },
            )],
        );
        assert!(
            m.starts_with("prompts[0].width: 0 is outside [1, 8192]"),
            "{m}"
        );
        let m = fails(
            &header("tiny"),
            &[with(
                "d",
                RenderParams {
                    width: Some(9000),
                    ..Default::default()
                },
            )],
        );
        assert!(m.starts_with("prompts[0].width: 9000 is outside"), "{m}");
        let m = fails(
            &header("capped"),
            &[with(
                "d",
                RenderParams {
                    width: Some(2048),
                    height: Some(2048),
                    ..Default::default()
                },
            )],
        );
        assert!(m.starts_with("prompts[0]: 2048×2048 is larger than"), "{m}");
    }

    #[test]
    fn steps_and_guidance() {
        let m = fails(
            &header("tiny"),
            &[with(
                "a",
                RenderParams {
                    steps: Some(0),
                    ..Default::default()
                },
            )],
        );
        assert_eq!(m, "prompts[0].steps: 0 is outside [1, 1000]");
        let m = fails(
            &header("tiny"),
            &[with(
                "a",
                RenderParams {
                    steps: Some(1001),
                    ..Default::default()
                },
            )],
        );
        assert_eq!(m, "prompts[0].steps: 1001 is outside [1, 1000]");
        let m = fails(
            &header("tiny"),
            &[with(
                "a",
                RenderParams {
                    guidance: Some(f64::NAN),
                    ..Default::default()
                },
            )],
        );
        assert!(m.starts_with("prompts[0].guidance: NaN"), "{m}");
        let m = fails(
            &header("tiny"),
            &[with(
                "a",
                RenderParams {
                    guidance: Some(-1.0),
                    ..Default::default()
                },
            )],
        );
        assert!(m.starts_with("prompts[0].guidance: -1"), "{m}");
        let m = fails(
            &header("tiny"),
            &[with(
                "a",
                RenderParams {
                    guidance: Some(1e9),
                    ..Default::default()
                },
            )],
        );
        assert!(m.starts_with("prompts[0].guidance: "), "{m}");
    }

    #[test]
    fn header_defaults() {
        let mut h = header("tiny");
        h.defaults = Some(RenderParams {
            steps: Some(0),
            height: Some(99999),
            ..Default::default()
        });
        let m = fails(&h, &[item("a")]);
        assert!(
            m.contains("header.defaults.height: 99999 is outside"),
            "{m}"
        );
        assert!(m.contains("header.defaults.steps: 0 is outside"), "{m}");
        let mut h = header("tiny");
        h.label = "l".repeat(MAX_LABEL_BYTES + 1);
        assert!(fails(&h, &[item("a")]).starts_with("header.label: "));
    }

    #[test]
    fn names() {
        let mut it = item("a");
        it.name = "../evil".into();
        assert!(fails(&header("tiny"), &[it.clone()]).starts_with("prompts[0].name: "));
        it.name = "a/b".into();
        assert!(fails(&header("tiny"), &[it.clone()]).starts_with("prompts[0].name: "));
        it.name = "fine-name".into();
        assert!(validate_batch(&header("tiny"), &[it], &models(), 0).is_ok());
    }

    #[test]
    fn collects_all_errors() {
        let items: Vec<PromptItem> = (0..15).map(|_| item("")).collect();
        let e = validate_batch(&header("tiny"), &items, &models(), 0).unwrap_err();
        assert_eq!(e.0.len(), 15);
        let m = e.to_string();
        assert!(
            m.starts_with("prompts[0].prompt: empty; prompts[1].prompt: empty"),
            "{m}"
        );
        assert!(m.ends_with("(and 5 more errors)"), "{m}");
        let status: tonic::Status = crate::error::CoordError::from(e).into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
