//! One error type, one table: every failure reaches the wire through [`Error::code`],
//! [`Error::status`] and [`Error::public_message`]. Detail for operators goes to the log only,
//! under the same request id.

use crate::identity::IdentityError;
use crate::policy::Denial;

#[derive(Debug)]
pub enum Error {
    /// Malformed JSON, unknown field, bad ttl. The message is about the caller's own request.
    BadRequest(String),
    /// Any token problem. Callers get one fixed message; the reason is logged.
    InvalidToken(IdentityError),
    /// A policy said no, or the policy does not exist (same shape: no existence oracle).
    Denied(Denial),
    PayloadTooLarge,
    /// A renewal of a lease that cannot be renewed now (it ended, reached its end, or its policy
    /// no longer allows renewal). Told only to a caller that proved it holds the lease's renew
    /// token; the message names the reason.
    NotRenewable(String),
    /// An admin endpoint without a valid admin token.
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    /// A credential backend failed; `detail` (upstream text) is logged, never returned.
    /// `advice`, the backend's own words on what to fix, is returned; `retry_after_secs` makes it
    /// a 503 with `Retry-After` (the upstream rate-limited the broker).
    Backend {
        backend: String,
        detail: String,
        advice: Option<String>,
        retry_after_secs: Option<i64>,
    },
    /// Fail closed: the ledger or audit log cannot be written, or the broker is shutting down.
    Unavailable(String),
    /// A bug.
    Internal(String),
    /// An abuse limit (`crate::limits`) refused the request before any work was done for it:
    /// `limit` names which (`address`, `cool-off`, `issuer`, `repository`), never the key.
    RateLimited {
        limit: &'static str,
        retry_after_secs: i64,
    },
    /// A bound on concurrent work is reached (too many requests issuing credentials at once, or
    /// a backend's upstream calls all taken): nothing was done; try again shortly.
    Overloaded(&'static str),
    /// The client sent its request body too slowly (a slow-client bound).
    RequestTimeout,
    /// `POST /oauth/token` refused a request for a reason only token exchange has; `code` is the
    /// RFC 6749 §5.2 / RFC 8693 §2.2.2 error code. `message` is about the caller's own request
    /// or tokens, never a claim value; `detail` goes to the log only.
    OAuth {
        code: &'static str,
        message: String,
        detail: String,
    },
}

/// How loudly an error is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Error {
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) | Error::OAuth { .. } => 400,
            Error::InvalidToken(_) | Error::Unauthorized => 401,
            Error::Denied(_) => 403,
            Error::NotFound => 404,
            Error::MethodNotAllowed => 405,
            Error::NotRenewable(_) => 409,
            Error::RequestTimeout => 408,
            Error::PayloadTooLarge => 413,
            Error::RateLimited { .. } => 429,
            Error::Overloaded(_) => 503,
            Error::Backend { retry_after_secs: Some(_), .. } => 503,
            Error::Backend { .. } => 502,
            Error::Unavailable(_) => 503,
            Error::Internal(_) => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::InvalidToken(_) => "invalid_token",
            Error::Unauthorized => "unauthorized",
            Error::Denied(_) => "policy_denied",
            Error::NotFound => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::NotRenewable(_) => "lease_not_renewable",
            Error::PayloadTooLarge => "payload_too_large",
            Error::RequestTimeout => "request_timeout",
            Error::RateLimited { .. } => "rate_limited",
            Error::Overloaded(_) => "overloaded",
            Error::Backend { retry_after_secs: Some(_), .. } => "backend_rate_limited",
            Error::Backend { .. } => "backend_error",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
            Error::OAuth { code, .. } => code,
        }
    }

    /// What the caller reads. Never a secret, never upstream text, never an expected claim value.
    pub fn public_message(&self) -> String {
        match self {
            Error::BadRequest(m) | Error::OAuth { message: m, .. } => m.clone(),
            Error::InvalidToken(_) => "the token is not valid for this broker".into(),
            Error::Unauthorized => {
                "this endpoint needs valid credentials (the admin token, or the webhook's secret)".into()
            }
            Error::Denied(d) => d.public_message(),
            Error::NotFound => "no such endpoint".into(),
            Error::MethodNotAllowed => "method not allowed on this endpoint".into(),
            Error::PayloadTooLarge => "the request body is larger than the limit".into(),
            Error::NotRenewable(why) => why.clone(),
            Error::RequestTimeout => "the request body was not sent in time".into(),
            Error::RateLimited { limit, retry_after_secs } => format!(
                "too many requests for this {}; retry after {retry_after_secs} s",
                match *limit {
                    "cool-off" => "client address after repeated failures",
                    "address" => "client address",
                    "issuer" => "token issuer",
                    _ => "repository",
                }
            ),
            Error::Overloaded(what) => format!("the broker is at its bound on {what}; nothing was done, retry shortly"),
            Error::Backend { backend, advice: Some(advice), .. } => format!("credential backend `{backend}`: {advice}"),
            Error::Backend { backend, .. } => {
                format!("credential backend `{backend}` failed; the request id leads to the detail in the broker log")
            }
            Error::Unavailable(_) => "the broker cannot record credentials right now; nothing was issued".into(),
            Error::Internal(_) => "internal error; the request id leads to the detail in the broker log".into(),
        }
    }

    /// What the log records beside the request id (no secrets: identity errors carry none).
    pub fn log_detail(&self) -> String {
        match self {
            Error::InvalidToken(e) => e.to_string(),
            Error::Denied(d) => d.log_detail(),
            Error::Backend { backend, detail, .. } => format!("backend {backend}: {detail}"),
            Error::Unavailable(d) | Error::Internal(d) | Error::BadRequest(d) | Error::NotRenewable(d) => d.clone(),
            Error::OAuth { detail, .. } => detail.clone(),
            other => other.code().to_string(),
        }
    }

    pub fn level(&self) -> Level {
        match self {
            Error::Backend { .. } | Error::Unavailable(_) | Error::Internal(_) => Level::Error,
            Error::InvalidToken(_)
            | Error::Denied(_)
            | Error::Unauthorized
            | Error::OAuth { .. }
            | Error::Overloaded(_) => Level::Warn,
            _ => Level::Info,
        }
    }
}

impl Error {
    /// Seconds a caller should wait before trying again (`Retry-After`), when known.
    pub fn retry_after_secs(&self) -> Option<i64> {
        match self {
            Error::Backend { retry_after_secs, .. } => *retry_after_secs,
            Error::RateLimited { retry_after_secs, .. } => Some(*retry_after_secs),
            Error::Overloaded(_) => Some(1),
            _ => None,
        }
    }
}

impl From<IdentityError> for Error {
    fn from(e: IdentityError) -> Self {
        Error::InvalidToken(e)
    }
}

impl From<Denial> for Error {
    fn from(d: Denial) -> Self {
        Error::Denied(d)
    }
}
