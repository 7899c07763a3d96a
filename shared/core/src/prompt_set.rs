//! Prompt-set files: one prompt per line, or JSON Lines with per-line overrides.
//!
//! Plain lines are prompts. A line starting with `{` is a JSON object with a required
//! `prompt` and optional `negative_prompt`, `height`, `width`, `steps`, `guidance`, `seed`
//! and `name` (output file stem). Blank lines and lines starting with `#` are skipped.

use crate::RenderParams;
use serde::Deserialize;

/// One prompt of a set, with its overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLine {
    /// 1-based line number in the file (for error messages and stable job ids).
    pub line: usize,
    /// The prompt text.
    pub prompt: String,
    /// Per-line overrides.
    pub params: RenderParams,
    /// Optional output name.
    pub name: Option<String>,
}

/// A problem in a prompt-set file, naming the line.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PromptSetError {
    /// The file has no prompts at all.
    #[error("the prompt set is empty: write one prompt per line (or JSON Lines with a \"prompt\" field)")]
    Empty,
    /// A JSON line could not be parsed.
    #[error("line {line}: invalid JSON prompt line: {reason}")]
    BadJson {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A line's prompt is empty.
    #[error("line {line}: empty prompt")]
    EmptyPrompt {
        /// 1-based line number.
        line: usize,
    },
    /// A `name` that is not a safe file stem.
    #[error("line {line}: name {name:?} must be a plain file name (letters, digits, '-', '_', '.'; no '/')")]
    BadName {
        /// 1-based line number.
        line: usize,
        /// The offending name.
        name: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    prompt: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(flatten)]
    params: RenderParamsFields,
}

// `deny_unknown_fields` does not work with `flatten`, so the fields are repeated here.
#[derive(Deserialize, Default)]
struct RenderParamsFields {
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    steps: Option<u32>,
    #[serde(default)]
    guidance: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
}

/// Parses a prompt-set file's text.
pub fn parse_prompt_set(text: &str) -> Result<Vec<PromptLine>, PromptSetError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if trimmed.starts_with('{') {
            let j: JsonLine =
                serde_json::from_str(trimmed).map_err(|e| PromptSetError::BadJson {
                    line,
                    reason: e.to_string(),
                })?;
            if j.prompt.trim().is_empty() {
                return Err(PromptSetError::EmptyPrompt { line });
            }
            if let Some(name) = &j.name {
                let ok = !name.is_empty()
                    && name != "."
                    && name != ".."
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    return Err(PromptSetError::BadName {
                        line,
                        name: name.clone(),
                    });
                }
            }
            let p = j.params;
            out.push(PromptLine {
                line,
                prompt: j.prompt,
                params: RenderParams {
                    negative_prompt: p.negative_prompt,
                    height: p.height,
                    width: p.width,
                    steps: p.steps,
                    guidance: p.guidance,
                    seed: p.seed,
                },
                name: j.name,
            });
        } else {
            out.push(PromptLine {
                line,
                prompt: trimmed.to_string(),
                params: RenderParams::default(),
                name: None,
            });
        }
    }
    if out.is_empty() {
        return Err(PromptSetError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_json_lines() {
        let text = "# comment\na cat\n\n{\"prompt\": \"a dog\", \"steps\": 5, \"seed\": 7, \"name\": \"dog\"}\n";
        let set = parse_prompt_set(text).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set[0].prompt, "a cat");
        assert_eq!(set[0].line, 2);
        assert_eq!(set[1].params.steps, Some(5));
        assert_eq!(set[1].params.seed, Some(7));
        assert_eq!(set[1].name.as_deref(), Some("dog"));
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse_prompt_set("\n# x\n"), Err(PromptSetError::Empty));
        let e = parse_prompt_set("a\n{\"prompt\": \"b\", \"stepz\": 3}").unwrap_err();
        assert!(matches!(e, PromptSetError::BadJson { line: 2, .. }), "{e}");
        let e = parse_prompt_set("{\"prompt\": \"  \"}").unwrap_err();
        assert_eq!(e, PromptSetError::EmptyPrompt { line: 1 });
        let e = parse_prompt_set("{\"prompt\": \"x\", \"name\": \"../etc\"}").unwrap_err();
        assert!(matches!(e, PromptSetError::BadName { .. }));
    }

    #[test]
    fn overrides_merge() {
        let d = RenderParams {
            steps: Some(20),
            guidance: Some(4.5),
            ..Default::default()
        };
        let o = RenderParams {
            steps: Some(5),
            ..Default::default()
        };
        let m = o.or(&d);
        assert_eq!(m.steps, Some(5));
        assert_eq!(m.guidance, Some(4.5));
    }
}
