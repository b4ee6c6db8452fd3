//! The request path: route, select, forward, stream back.

pub mod body;
pub mod error;
pub mod forward;
pub mod headers;
pub mod upgrade;

pub use body::ProxyBody;
pub use error::ProxyError;
pub use forward::{ClientInfo, Proxy};
