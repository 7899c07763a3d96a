//! Coordinator errors and their one mapping to gRPC statuses.

use tonic::Status;

/// Everything an RPC of the coordinator can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The request is malformed; the message names the field(s) and the rule.
    #[error("{0}")]
    Invalid(String),
    /// Something named by the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Redis cannot be reached (yet); the request can be retried.
    #[error(
        "redis at {url} is unreachable ({detail}); the request was not applied and can be retried"
    )]
    RedisUnavailable {
        /// The Redis URL (password removed).
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// Redis answered with an error that retrying will not fix.
    #[error("redis error: {0}")]
    Redis(String),
    /// Stored data could not be read back (corrupt or written by another version).
    #[error("corrupt record {key}: {detail}")]
    Corrupt {
        /// The Redis key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Reading the result store failed.
    #[error("result store: {0}")]
    Store(String),
    /// The coordinator is shutting down.
    #[error("coordinator is shutting down; retry against another coordinator")]
    ShuttingDown,
}

impl CoordError {
    /// A stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CoordError::Invalid(_) => "invalid_argument",
            CoordError::NotFound(_) => "not_found",
            CoordError::RedisUnavailable { .. } => "redis_unavailable",
            CoordError::Redis(_) => "redis_error",
            CoordError::Corrupt { .. } => "corrupt_record",
            CoordError::Store(_) => "result_store",
            CoordError::ShuttingDown => "shutting_down",
        }
    }

    /// Classifies a Redis error: connection trouble is `RedisUnavailable`, anything else `Redis`.
    pub fn from_redis(url: &str, e: &redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_unrecoverable_error()
        {
            CoordError::RedisUnavailable {
                url: url.to_string(),
                detail: e.to_string(),
            }
        } else {
            CoordError::Redis(e.to_string())
        }
    }
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        let msg = e.to_string();
        match e {
            CoordError::Invalid(_) => Status::invalid_argument(msg),
            CoordError::NotFound(_) => Status::not_found(msg),
            CoordError::RedisUnavailable { .. } | CoordError::ShuttingDown => {
                Status::unavailable(msg)
            }
            CoordError::Redis(_) | CoordError::Corrupt { .. } | CoordError::Store(_) => {
                Status::internal(msg)
            }
        }
    }
}

/// Removes a password from a Redis URL before it is shown (`redis://:pw@host` → `redis://***@host`).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// Coordinator result.
pub type Result<T, E = CoordError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let s: Status = CoordError::Invalid("prompts[0].prompt: empty".into()).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "prompts[0].prompt: empty");
        let s: Status = CoordError::RedisUnavailable {
            url: "redis://127.0.0.1:1".into(),
            detail: "connection refused".into(),
        }
        .into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("redis://127.0.0.1:1"));
        assert!(s.message().contains("retried"));
        assert_eq!(CoordError::NotFound("x".into()).label(), "not_found");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
