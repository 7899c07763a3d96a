//! Batch events as Redis stream entries (`rf:batch:{id}:events`), and back.
//!
//! Every entry has `k` (kind), `j` (job id, "" for batch-level events) and `x` (job index);
//! then per kind:
//!
//! | `k` | event | fields |
//! |---|---|---|
//! | `q` | JobQueued | — |
//! | `s` | JobStarted | `w` worker id, `a` attempt |
//! | `p` | StepProgress | `st` step, `t` total |
//! | `i` | ImageReady | `r` image ref, `w` width, `h` height, `sd` seed, `b` bytes |
//! | `f` | JobFailed | `r` reason, `a` attempts |
//! | `c` | JobCancelled | — |
//! | `d` | BatchDone | `d` done, `f` failed, `c` cancelled |
//!
//! The Lua scripts in `scripts` write the same fields. The entry id is the event id.

use relayfarm_proto::v1::{
    batch_event::Kind, BatchDone, BatchEvent, ImageReady, JobCancelled, JobFailed, JobQueued,
    JobStarted, StepProgress,
};

/// Encodes an event's fields (without its id) for `XADD`.
pub fn encode(ev: &BatchEvent) -> Vec<(&'static str, String)> {
    let mut f: Vec<(&'static str, String)> = Vec::with_capacity(8);
    let kind = match &ev.kind {
        Some(Kind::Queued(_)) | None => "q",
        Some(Kind::Started(_)) => "s",
        Some(Kind::Step(_)) => "p",
        Some(Kind::Image(_)) => "i",
        Some(Kind::Failed(_)) => "f",
        Some(Kind::Cancelled(_)) => "c",
        Some(Kind::Done(_)) => "d",
    };
    f.push(("k", kind.into()));
    f.push(("j", ev.job_id.clone()));
    f.push(("x", ev.index.to_string()));
    match &ev.kind {
        Some(Kind::Started(s)) => {
            f.push(("w", s.worker_id.clone()));
            f.push(("a", s.attempt.to_string()));
        }
        Some(Kind::Step(s)) => {
            f.push(("st", s.step.to_string()));
            f.push(("t", s.total.to_string()));
        }
        Some(Kind::Image(i)) => {
            f.push(("r", i.image_ref.clone()));
            f.push(("w", i.width.to_string()));
            f.push(("h", i.height.to_string()));
            f.push(("sd", i.seed.to_string()));
            f.push(("b", i.bytes.to_string()));
        }
        Some(Kind::Failed(x)) => {
            f.push(("r", x.reason.clone()));
            f.push(("a", x.attempts.to_string()));
        }
        Some(Kind::Done(d)) => {
            f.push(("d", d.done.to_string()));
            f.push(("f", d.failed.to_string()));
            f.push(("c", d.cancelled.to_string()));
        }
        Some(Kind::Queued(_)) | Some(Kind::Cancelled(_)) | None => {}
    }
    f
}

/// Decodes a stream entry into an event of `batch_id`.
pub fn decode(
    batch_id: &str,
    entry_id: &str,
    fields: &[(String, String)],
) -> Result<BatchEvent, String> {
    let get = |name: &str| -> Option<&str> {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let text = |name: &str| get(name).unwrap_or_default().to_string();
    let num = |name: &str| -> Result<u64, String> {
        let v = get(name).unwrap_or("0");
        v.parse::<u64>()
            .map_err(|_| format!("event {entry_id}: field `{name}` = {v:?} is not a number"))
    };
    let num32 = |name: &str| -> Result<u32, String> {
        let v = num(name)?;
        u32::try_from(v).map_err(|_| format!("event {entry_id}: field `{name}` = {v} is too large"))
    };
    let kind = match get("k") {
        Some("q") => Kind::Queued(JobQueued {}),
        Some("s") => Kind::Started(JobStarted {
            worker_id: text("w"),
            attempt: num32("a")?,
        }),
        Some("p") => Kind::Step(StepProgress {
            step: num32("st")?,
            total: num32("t")?,
        }),
        Some("i") => Kind::Image(ImageReady {
            image_ref: text("r"),
            width: num32("w")?,
            height: num32("h")?,
            seed: num("sd")?,
            bytes: num("b")?,
        }),
        Some("f") => Kind::Failed(JobFailed {
            reason: text("r"),
            attempts: num32("a")?,
        }),
        Some("c") => Kind::Cancelled(JobCancelled {}),
        Some("d") => Kind::Done(BatchDone {
            done: num32("d")?,
            failed: num32("f")?,
            cancelled: num32("c")?,
        }),
        other => return Err(format!("event {entry_id}: unknown kind {other:?}")),
    };
    Ok(BatchEvent {
        event_id: entry_id.to_string(),
        batch_id: batch_id.to_string(),
        job_id: text("j"),
        index: num32("x")?,
        kind: Some(kind),
    })
}

/// Whether an event ends a batch's stream.
pub fn is_batch_done(ev: &BatchEvent) -> bool {
    matches!(ev.kind, Some(Kind::Done(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(kind: Kind) {
        let ev = BatchEvent {
            event_id: String::new(),
            batch_id: "b1".into(),
            job_id: "b1-00003".into(),
            index: 3,
            kind: Some(kind),
        };
        let fields: Vec<(String, String)> = encode(&ev)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let back = decode("b1", "1-0", &fields).unwrap();
        assert_eq!(back.event_id, "1-0");
        assert_eq!(
            BatchEvent {
                event_id: String::new(),
                ..back
            },
            ev
        );
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(Kind::Queued(JobQueued {}));
        round_trip(Kind::Started(JobStarted {
            worker_id: "w1".into(),
            attempt: 2,
        }));
        round_trip(Kind::Step(StepProgress { step: 3, total: 20 }));
        round_trip(Kind::Image(ImageReady {
            image_ref: "b1/00003-cat.png".into(),
            width: 32,
            height: 48,
            seed: u64::MAX,
            bytes: 1234,
        }));
        round_trip(Kind::Failed(JobFailed {
            reason: "dead-lettered after 3 attempts: boom".into(),
            attempts: 3,
        }));
        round_trip(Kind::Cancelled(JobCancelled {}));
        round_trip(Kind::Done(BatchDone {
            done: 48,
            failed: 1,
            cancelled: 1,
        }));
    }

    #[test]
    fn bad_entries_are_errors() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert!(decode("b", "1-0", &f(&[("k", "zz")])).is_err());
        assert!(decode("b", "1-0", &f(&[("k", "p"), ("st", "x")])).is_err());
        let done = decode("b", "1-0", &f(&[("k", "d"), ("j", ""), ("d", "2")])).unwrap();
        assert!(is_batch_done(&done));
    }
}
