//! Proxy errors and the one place that turns them into HTTP responses.
//! The client sees a status and a short fixed text; the detail goes to the log.

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::upstream::UpstreamError;

use super::body::ProxyBody;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for this host and path")]
    NoRoute,
    #[error("pool {pool} has no backend to try")]
    NoBackend { pool: String },
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    #[error("the backend pinned by affinity in pool {pool} is unreachable and the pool rejects")]
    Rejected { pool: String },
    #[error("every backend of pool {pool} is unreachable; last error: {last}")]
    AllUnreachable { pool: String, last: UpstreamError },
    #[error("upstream request failed: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("no response headers from the backend within {0:?}")]
    Timeout(Duration),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("more than {} header fields", crate::proxy::headers::MAX_FIELDS)]
    TooManyFields,
    #[error("CONNECT is not proxied")]
    MethodNotAllowed,
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("bad response from the backend: {0}")]
    BadResponse(&'static str),
    #[error("the request body could not be read from the client: {0}")]
    RequestBody(#[source] hyper::Error),
    #[error("the client sent no more of its request body for {0:?}")]
    ClientTimeout(Duration),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) | ProxyError::RequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::TooManyFields => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoBackend { .. }
            | ProxyError::Connect(UpstreamError::Full { .. })
            | ProxyError::AllUnreachable { .. }
            | ProxyError::Rejected { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_) | ProxyError::Upstream(_) | ProxyError::BadResponse(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether the request itself was at fault (a `4xx` other than "no route", or a
    /// `501` for what it asked of the proxy).
    pub fn is_clients_fault(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::TooManyFields
                | ProxyError::RequestBody(_)
                | ProxyError::ClientTimeout(_)
                | ProxyError::MethodNotAllowed
                | ProxyError::NotImplemented(_)
        )
    }

    /// The response the client gets: status, and the status's reason as plain text.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let text = format!(
            "{} {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let mut resp = Response::new(ProxyBody::full(text));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::NoRoute.status(), 404);
        assert_eq!(ProxyError::NoBackend { pool: "p".into() }.status(), 503);
        assert_eq!(ProxyError::Timeout(Duration::from_secs(1)).status(), 504);
        assert_eq!(
            ProxyError::ClientTimeout(Duration::from_secs(1)).status(),
            408
        );
        let e = UpstreamError::ConnectTimeout {
            addr: "10.0.0.1:1".into(),
            after: Duration::from_secs(1),
        };
        let e = ProxyError::from(e);
        assert_eq!(e.status(), 502);
        assert_eq!(e.to_response().status(), 502);
    }
}
