//! Header rules for forwarded requests and returned responses.
//!
//! Hop-by-hop fields (RFC 9110 §7.6.1) belong to one connection and are removed, with
//! every field the `Connection` header names. `X-Forwarded-For` gets the client address
//! appended; `X-Forwarded-Proto` and `X-Forwarded-Host` are set; `Host` is kept; an
//! `X-Request-Id` is propagated or generated.

use std::io::Write;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

/// Fields that are meaningful for a single connection only (RFC 9110 §7.6.1, plus the
/// non-standard `Proxy-Connection` and `Keep-Alive` that clients still send).
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Longest accepted incoming request id; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// True when the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap, version: Version) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && connection_has(headers, "upgrade")
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(value_tokens)
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Removes hop-by-hop fields. With `upgrade`, keeps `Upgrade` and sets
/// `Connection: upgrade` so the handshake reaches the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names finds which hop-by-hop fields are present, so messages
    // without them (most) cost no lookups.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name.as_str().as_bytes()) {
            present |= 1 << i;
        }
    }
    if present & (1 << CONNECTION_INDEX) != 0
        && connection_tokens(headers).any(|t| !is_hop_by_hop(t))
    {
        // `Connection` names other fields too (hop-by-hop ones go below anyway).
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !is_hop_by_hop(t))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 && !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if present & (1 << TRANSFER_ENCODING_INDEX) != 0 {
        // The body was de-chunked and is framed anew for the other side; a
        // Content-Length that came beside Transfer-Encoding (RFC 9112 §6.3) must not
        // survive, or it would frame that body differently.
        headers.remove(header::CONTENT_LENGTH);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

const CONNECTION_INDEX: usize = 0;
const TRANSFER_ENCODING_INDEX: usize = 4;

/// The position of a (lowercase) field name in `HOP_BY_HOP`.
fn hop_by_hop_index(name: &[u8]) -> Option<usize> {
    let i = match name {
        b"connection" => CONNECTION_INDEX,
        b"proxy-connection" => 1,
        b"keep-alive" => 2,
        b"te" => 3,
        b"transfer-encoding" => TRANSFER_ENCODING_INDEX,
        b"upgrade" => 5,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP[i].as_str().as_bytes(), name);
    Some(i)
}

/// The comma-separated tokens of a list-valued field, trimmed; none if the value is not
/// visible ASCII.
fn value_tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    // Bytes, not `str::split`: several times cheaper, and this runs on most responses
    // (`Connection: keep-alive`).
    let bytes = if value.to_str().is_ok() {
        value.as_bytes()
    } else {
        b""
    };
    bytes
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn is_hop_by_hop(token: &[u8]) -> bool {
    // Tokens are mostly lowercase already: try the exact match first.
    hop_by_hop_index(token).is_some()
        || HOP_BY_HOP
            .iter()
            .any(|h| token.eq_ignore_ascii_case(h.as_str().as_bytes()))
}

/// The request's host, once [`prepare_request`] has settled its `Host` field.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
}

/// What [`prepare_request`] found out about a request.
#[derive(Debug)]
pub struct Prepared {
    /// The request id, propagated or generated.
    pub request_id: HeaderValue,
    /// Why the request's host is unusable (the request gets 400), if it is. The backend
    /// must read the same host as routing did, and HTTP/1.1 requires one.
    pub bad_host: Option<&'static str>,
}

/// Whether `host` is a valid `Host` field value (RFC 9110 §7.2): `uri-host [":" port]`,
/// or empty. The common shapes (a name or an IPv4 address, and a port) are checked
/// here; anything else must parse as a URI authority without user information.
fn valid_host(host: &[u8]) -> bool {
    let (name, port) = match host.iter().rposition(|&b| b == b':') {
        Some(i) => (&host[..i], &host[i + 1..]),
        None => (host, &b""[..]),
    };
    let plain = !name.is_empty()
        && name.iter().all(|&b| NAME_CHAR[usize::from(b)])
        && port.iter().all(u8::is_ascii_digit);
    plain || host.is_empty() || valid_authority(host)
}

/// The characters of a host name or IPv4 address: letters, digits, `.` and `-`.
static NAME_CHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
        b += 1;
    }
    t
};

/// The rarer shapes of a `Host` value (an IPv6 literal, percent-encoding, other
/// characters a URI allows): it must parse as a URI authority with a host, no user
/// information and a numeric port if any.
#[cold]
fn valid_authority(host: &[u8]) -> bool {
    if host.contains(&b'@') {
        return false;
    }
    // The URI parser accepts user information (refused above) and any port text.
    http::uri::Authority::try_from(host).is_ok_and(|a| {
        let port = &a.as_str()[a.host().len()..];
        let port_ok = port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
        !a.host().is_empty() && port_ok
    })
}

/// Settles the request's one `Host` field: the target's authority where the request
/// has one (an absolute-form target, whose authority HTTP/1.1 says overrides `Host`, or
/// HTTP/2's `:authority`), else the `Host` field, else empty (an HTTP/1.0 request may
/// have none; the backend is spoken to in HTTP/1.1, which needs the field). Returns the
/// host, or why the request cannot be forwarded.
fn settle_host(
    headers: &mut HeaderMap,
    authority: Option<HeaderValue>,
    version: Version,
) -> Result<HeaderValue, &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let field = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err("more than one Host field");
    }
    let host = match (authority, field) {
        (Some(a), Some(h))
            if version == Version::HTTP_2 && !a.as_bytes().eq_ignore_ascii_case(h.as_bytes()) =>
        {
            return Err("Host differs from :authority");
        }
        (Some(a), h) => {
            if h.as_ref() != Some(&a) {
                headers.insert(header::HOST, a.clone());
            }
            a
        }
        (None, Some(h)) => h,
        (None, None) if version == Version::HTTP_11 => return Err("no Host field"),
        (None, None) => {
            let empty = HeaderValue::from_static("");
            headers.insert(header::HOST, empty.clone());
            empty
        }
    };
    if valid_host(host.as_bytes()) {
        Ok(host)
    } else {
        Err("invalid Host field")
    }
}

/// Rewrites a downstream request for an HTTP/1.1 backend.
pub fn prepare_request<B>(
    req: &mut Request<B>,
    client: IpAddr,
    proto: &'static str,
    upgrade: bool,
) -> Prepared {
    let authority = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let version = req.version();
    let req_scheme_missing = req.uri().scheme().is_none();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    // Authority-form (`GET a.example:80 HTTP/1.1`) is for CONNECT only (RFC 9112
    // §3.2.3); taken as a host, it would override `Host` with the request line's word.
    let authority_form = authority.is_some() && req_scheme_missing;
    let host = if authority_form {
        Err("a target in authority form")
    } else {
        settle_host(headers, authority, version)
    };
    match &host {
        Ok(host) if !host.is_empty() => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        _ => {}
    }
    append_forwarded_for(headers, client);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    let request_id = match headers.entry(&X_REQUEST_ID) {
        Entry::Occupied(e) if valid_request_id(e.get()) => e.get().clone(),
        Entry::Occupied(mut e) => {
            let id = new_request_id();
            e.insert(id.clone());
            id
        }
        Entry::Vacant(e) => e.insert(new_request_id()).clone(),
    };
    // Backends get origin-form over HTTP/1.1, whatever the client spoke.
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        if let Ok(uri) = pq.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = Version::HTTP_11;
    Prepared {
        request_id,
        bad_host: host.err(),
    }
}

/// Rewrites a backend response for the client.
pub fn prepare_response(headers: &mut HeaderMap, request_id: HeaderValue, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    headers.insert(X_REQUEST_ID.clone(), request_id);
}

/// An IP address as text, owned by a `Bytes` so that copies of the header value only
/// count references (a `Bytes` made from a copied slice or a `Vec` allocates again on
/// its first clone).
struct IpText {
    buf: [u8; MAX_IP_TEXT],
    len: usize,
}

impl AsRef<[u8]> for IpText {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let mut buf = [0u8; MAX_IP_TEXT];
    let ip = write_ip(client, &mut buf);
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(e) => {
            let len = ip.len();
            let text = Bytes::from_owner(IpText { buf, len });
            e.insert(
                HeaderValue::from_maybe_shared(text)
                    .expect("an IP address is a valid header value"),
            );
        }
        Entry::Occupied(mut e) => {
            let mut joined = Vec::new();
            for prior in e.iter().filter_map(|v| v.to_str().ok()) {
                joined.extend_from_slice(prior.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(ip);
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from_owner(joined)) {
                e.insert(v);
            }
        }
    }
}

/// Longest text form of an IP address (an IPv6 address with an embedded IPv4 one).
const MAX_IP_TEXT: usize = 45;

/// Writes `ip` as text into `buf` without allocating, IPv4-mapped IPv6 addresses in
/// their IPv4 form; returns the written part.
fn write_ip(ip: IpAddr, buf: &mut [u8; MAX_IP_TEXT]) -> &[u8] {
    let len = match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                n += write_decimal(octet, &mut buf[n..]);
            }
            n
        }
        IpAddr::V6(v6) => {
            let mut rest = &mut buf[..];
            write!(rest, "{v6}").expect("an IPv6 address fits in 45 bytes");
            MAX_IP_TEXT - rest.len()
        }
    };
    &buf[..len]
}

/// Writes `v` in decimal at the start of `out`; returns the number of digits.
fn write_decimal(v: u8, out: &mut [u8]) -> usize {
    let digits = [v / 100, v / 10 % 10, v % 10];
    let skip = if v >= 100 {
        0
    } else if v >= 10 {
        1
    } else {
        2
    };
    for (o, d) in out.iter_mut().zip(&digits[skip..]) {
        *o = b'0' + d;
    }
    3 - skip
}

fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic())
}

/// 128 random bits as 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for (pair, byte) in buf
        .chunks_exact_mut(2)
        .zip(fastrand::u128(..).to_be_bytes())
    {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    // Owned by the `Bytes`: one allocation, and clones only count references.
    HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
        .expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values() {
        for good in [
            "a.example",
            "A.Example:8080",
            "a.example:",
            "127.0.0.1",
            "[::1]",
            "[::1]:443",
            "a_b.example",
            "xn--bcher-kva.example.",
            "",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "a b",
            "user@a.example",
            "a.example/x",
            "a.example:80x",
            "a.example:-1",
            "[::1",
            "[::1]x",
            ":80",
            "a.example\\x",
            "a.example?",
            "a.example#",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrade_keeps_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h, Version::HTTP_11));
        assert!(!is_upgrade(&h, Version::HTTP_2));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn client_addresses_are_written_like_display() {
        let mut buf = [0u8; MAX_IP_TEXT];
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let text = write_ip(ip, &mut buf);
            assert_eq!(text, ip.to_canonical().to_string().as_bytes(), "{ip}");
        }
    }

    #[test]
    fn forwarded_for_appends_to_every_prior_value() {
        let client: IpAddr = "10.0.0.7".parse().unwrap();
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, client);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.7");
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        append_forwarded_for(&mut h, client);
        let all: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(all, ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.7"]);
    }

    #[test]
    fn connection_named_fields_are_removed_from_every_value() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close, x-a"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Connection, X-B"),
        );
        for name in ["x-a", "x-b", "close", "x-kept"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn request_ids_are_hex_and_distinct() {
        let a = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a
            .as_bytes()
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)));
        assert_ne!(a, new_request_id());
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(&HeaderValue::from_static("has space")));
    }
}
