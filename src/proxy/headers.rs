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
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::Body;

use super::error::ProxyError;

/// Fields that are meaningful for a single connection only (RFC 9110 §7.6.1, plus the
/// non-standard `Proxy-Connection` and `Keep-Alive` that clients still send).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    // The settings of an h2c upgrade, which is never passed on (RFC 7540 §3.2.1 calls
    // the field connection-specific).
    HeaderName::from_static("http2-settings"),
];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Longest accepted incoming request id; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// True when the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
/// `h2c` is not one: that upgrade would switch the connection to the proxy, not the
/// backend's, and RFC 9113 retired it; such a request is served as plain HTTP/1.1.
pub fn is_upgrade(headers: &HeaderMap, version: Version) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && !upgrade_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"h2c"))
        && connection_has(headers, "upgrade")
}

fn upgrade_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(value_tokens)
}

/// What an upgrade request offers to switch to: its `Upgrade` fields as one value.
pub fn upgrade_offer(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut fields = headers.get_all(header::UPGRADE).iter();
    let first = fields.next()?;
    if fields.next().is_none() {
        return Some(first.clone());
    }
    let all: Vec<&[u8]> = upgrade_tokens(headers).collect();
    HeaderValue::from_bytes(&all.join(&b", "[..])).ok()
}

/// Whether a backend's `101` switches to a protocol the client asked for (`asked`, the
/// request's `Upgrade` value): the answer must name at least one, and only such.
pub fn upgrade_agreed(asked: &HeaderValue, answer: &HeaderMap) -> bool {
    let mut named = upgrade_tokens(answer).peekable();
    named.peek().is_some() && named.all(|p| value_tokens(asked).any(|a| a.eq_ignore_ascii_case(p)))
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

/// Why a message's framing cannot be passed on as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFraming {
    /// A transfer coding other than `chunked` (`gzip, chunked`, say): the body is
    /// relayed de-chunked and framed anew, which would silently drop that coding.
    UnknownCoding,
    /// `Content-Length` values that disagree or are not numbers.
    Length,
}

impl BadFraming {
    /// Why, in words, for the log.
    pub fn reason(self) -> &'static str {
        match self {
            BadFraming::UnknownCoding => "a transfer coding other than chunked",
            BadFraming::Length => "conflicting Content-Length values",
        }
    }
}

/// Removes hop-by-hop fields. With `upgrade`, keeps `Upgrade` and sets
/// `Connection: upgrade` so the handshake reaches the other side. Settles the framing
/// fields: the body is framed anew for the other side, so `Content-Length` goes when
/// `Transfer-Encoding` came, and is otherwise left as one value in plain decimal.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) -> Result<(), BadFraming> {
    // One pass over the fields finds which of these are present, and reads the values
    // of `Connection` and `Content-Length` on the way, so that messages without them
    // (most), or with one plain value each, cost no lookups.
    let mut present = 0u8;
    let mut repeated = 0u8;
    let mut names_others = false;
    let mut plain_length = true;
    for (name, value) in headers.iter() {
        let Some(i) = framing_index(name.as_str().as_bytes()) else {
            continue;
        };
        repeated |= present & (1 << i);
        present |= 1 << i;
        match i {
            CONNECTION_INDEX => names_others |= value_tokens(value).any(|t| !is_hop_by_hop(t)),
            CONTENT_LENGTH_INDEX => plain_length &= is_plain_length(value.as_bytes()),
            _ => {}
        }
    }
    if names_others {
        // `Connection` names other fields too (hop-by-hop ones go below anyway).
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !is_hop_by_hop(t))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    let mut framing = Ok(());
    if present & (1 << TRANSFER_ENCODING_INDEX) != 0 {
        framing = only_chunked(headers);
        // A Content-Length that came beside Transfer-Encoding (RFC 9112 §6.3) must not
        // survive, or it would frame the body differently from the chunks it came in.
        present &= !(1 << CONTENT_LENGTH_INDEX);
        headers.remove(header::CONTENT_LENGTH);
    }
    if present & (1 << CONTENT_LENGTH_INDEX) != 0
        && (!plain_length || repeated & (1 << CONTENT_LENGTH_INDEX) != 0)
    {
        framing = fold_content_length(headers);
    }
    // Removed whatever the framing came to: trailers rely on it.
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 && !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    framing
}

/// Removes from trailers the fields that belong to one connection or frame the message,
/// which a trailer section must not carry (RFC 9110 §6.5.1): relayed, an HTTP/2 client
/// would reset the stream for them.
#[cold]
pub fn settle_trailers(trailers: &mut HeaderMap) {
    // Framing errors do not matter here: `Transfer-Encoding` went with the hop-by-hop
    // fields, and the length goes below.
    let _ = strip_hop_by_hop(trailers, false);
    trailers.remove(header::CONTENT_LENGTH);
    trailers.remove(header::HOST);
}

/// Checks that `Transfer-Encoding` names one coding, `chunked`, once: the body is
/// de-chunked once, and `chunked, chunked` would leave chunks in it. Not the obsolete
/// `identity` either: with it, a response's length is wherever the backend closes the
/// connection, whatever its `Content-Length` says (RFC 9112 §6.3).
#[cold]
fn only_chunked(headers: &HeaderMap) -> Result<(), BadFraming> {
    let values = headers.get_all(header::TRANSFER_ENCODING);
    // A value that is not visible ASCII has no tokens, and is no known coding.
    let readable = values.iter().all(|v| v.to_str().is_ok());
    let mut codings = values.iter().flat_map(value_tokens);
    let one_chunked = codings
        .next()
        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none();
    if readable && one_chunked {
        Ok(())
    } else {
        Err(BadFraming::UnknownCoding)
    }
}

/// Whether a `Content-Length` value is a number in plain decimal (no leading zero) that
/// fits in a `u64`.
fn is_plain_length(b: &[u8]) -> bool {
    (1..=19).contains(&b.len())
        && (b[0] != b'0' || b.len() == 1)
        && b.iter().all(u8::is_ascii_digit)
}

/// Leaves `Content-Length` as one value in plain decimal: repeats of one length (as
/// separate fields or a list) are folded, leading zeros dropped, so that whatever reads
/// the message next cannot read another length into it.
#[cold]
fn fold_content_length(headers: &mut HeaderMap) -> Result<(), BadFraming> {
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for t in v.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = std::str::from_utf8(t)
                .ok()
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or(BadFraming::Length)?;
            if length.is_some_and(|l| l != n) {
                return Err(BadFraming::Length);
            }
            length = Some(n);
        }
    }
    let length = length.ok_or(BadFraming::Length)?;
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(())
}

const CONNECTION_INDEX: usize = 0;
const TRANSFER_ENCODING_INDEX: usize = 4;
/// Not hop-by-hop, but found in the same pass.
const CONTENT_LENGTH_INDEX: usize = HOP_BY_HOP.len();

/// The position of a (lowercase) field name in `HOP_BY_HOP`, or `CONTENT_LENGTH_INDEX`.
fn framing_index(name: &[u8]) -> Option<usize> {
    if name == b"content-length" {
        return Some(CONTENT_LENGTH_INDEX);
    }
    hop_by_hop_index(name)
}

/// The position of a (lowercase) field name in `HOP_BY_HOP`.
fn hop_by_hop_index(name: &[u8]) -> Option<usize> {
    let i = match name {
        b"connection" => CONNECTION_INDEX,
        b"proxy-connection" => 1,
        b"keep-alive" => 2,
        b"te" => 3,
        b"transfer-encoding" => TRANSFER_ENCODING_INDEX,
        b"upgrade" => 5,
        b"http2-settings" => 6,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP[i].as_str().as_bytes(), name);
    Some(i)
}

/// The comma-separated tokens of a list-valued field, trimmed. A value with bytes
/// outside ASCII still yields its tokens: a `Connection` field naming `x-secret` beside
/// such a byte names `x-secret` all the same; a token that is no field name matches
/// none.
fn value_tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    // Bytes, not `str::split`: several times cheaper, and this runs on most responses
    // (`Connection: keep-alive`).
    value
        .as_bytes()
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

/// The most header fields a request may carry: hyper's HTTP/1.1 limit, applied to HTTP/2
/// requests too.
pub const MAX_FIELDS: usize = 100;

/// What [`prepare_request`] found out about a request.
#[derive(Debug)]
pub struct Prepared {
    /// The request id, propagated or generated.
    pub request_id: HeaderValue,
    /// The `Host` the backend gets, which routing reads too; `None` if it is unusable.
    pub host: Option<HeaderValue>,
    /// Why the request cannot be forwarded, if it cannot: its host is unusable (the
    /// backend must read the same host as routing did, and HTTP/1.1 requires one), or
    /// its framing is.
    pub refusal: Option<ProxyError>,
}

/// Whether `host` is a valid `Host` field value (RFC 9110 §7.2): `uri-host [":" port]`,
/// or empty. The common shapes (a name or an IPv4 address, and a port) are checked
/// here; anything else must parse as a URI authority without user information.
fn valid_host(host: &[u8]) -> bool {
    let (name, port) = match host.iter().rposition(|&b| b == b':') {
        Some(i) => (&host[..i], &host[i + 1..]),
        None => (host, &b""[..]),
    };
    let plain = !name.is_empty() && name.iter().all(|&b| NAME_CHAR[usize::from(b)]);
    (plain && valid_port(port)) || host.is_empty() || valid_authority(host)
}

/// Whether `port` is a port a TCP connection can have: empty (the default, as a URI
/// allows) or a number up to 65535.
fn valid_port(port: &[u8]) -> bool {
    port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535
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
                .is_some_and(|p| valid_port(p.as_bytes()));
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
        // An HTTP/1.1 request needs its `Host` field even with a target in absolute
        // form (RFC 9112 §3.2).
        (Some(_), None) if version == Version::HTTP_11 => return Err("no Host field"),
        (Some(a), h) => {
            if h.as_ref() != Some(&a) {
                headers.insert(header::HOST, a.clone());
            }
            a
        }
        (None, Some(h)) => h,
        // HTTP/1.1 requires the field; an HTTP/2 request without `:authority` has none
        // to give either (as nginx, refused alike).
        (None, None) if version >= Version::HTTP_11 => return Err("no Host field"),
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
pub fn prepare_request<B: Body>(
    req: &mut Request<B>,
    client: &ClientAddr,
    proto: &'static str,
    upgrade: bool,
) -> Prepared {
    let authority = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let version = req.version();
    let req_scheme_missing = req.uri().scheme().is_none();
    // A target in absolute form, or HTTP/2's `:scheme`, must name a scheme this proxy
    // serves.
    let odd_scheme = req
        .uri()
        .scheme_str()
        .is_some_and(|s| !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https"));
    // The asterisk form is for `OPTIONS` only (RFC 9112 §3.2.4).
    let stray_asterisk = req.uri().path() == "*" && req.method() != Method::OPTIONS;
    // A body of unknown length (chunked, or HTTP/2 without Content-Length) on a method
    // that rarely has one: hyper's client would send no body unless told to chunk it.
    let chunk_body = matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.body().is_end_stream()
        && req.body().size_hint().exact().is_none();
    let headers = req.headers_mut();
    let framing = strip_hop_by_hop(headers, upgrade);
    if chunk_body {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    // HTTP/1.1's parser trims field values; HTTP/2 forbids the whitespace it would trim
    // (RFC 9113 §8.2.1), and a backend that trims would read another value than the
    // proxy did.
    let mut padded = false;
    if version == Version::HTTP_2 {
        join_cookies(headers);
        padded = headers.values().any(|v| {
            let v = v.as_bytes();
            let blank = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
            blank(v.first()) || blank(v.last())
        });
    }
    // Authority-form (`GET a.example:80 HTTP/1.1`) is for CONNECT only (RFC 9112
    // §3.2.3); taken as a host, it would override `Host` with the request line's word.
    let authority_form = authority.is_some() && req_scheme_missing;
    let host = if authority_form {
        Err("a target in authority form")
    } else {
        settle_host(headers, authority, version)
    };
    // hyper's HTTP/1.1 parser refuses a head of more than `MAX_FIELDS` fields; HTTP/2's
    // limit is in bytes only, so the count is checked here, with cookies joined and
    // `Host` in, as an HTTP/1.1 request would have them.
    let too_many = version == Version::HTTP_2 && headers.len() > MAX_FIELDS;
    match &host {
        Ok(host) if !host.is_empty() => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        // No host to forward: the client's own field must not pass for the proxy's.
        _ => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    append_forwarded_for(headers, client);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    let request_id = match headers.entry(&X_REQUEST_ID) {
        // One id only: with two, the backend might log the other.
        Entry::Occupied(mut e) if valid_request_id(e.get()) => {
            let id = e.get().clone();
            if e.iter().nth(1).is_some() {
                e.insert(id.clone());
            }
            id
        }
        Entry::Occupied(mut e) => {
            let id = new_request_id();
            e.insert(id.clone());
            id
        }
        Entry::Vacant(e) => e.insert(new_request_id()).clone(),
    };
    // Backends get origin-form over HTTP/1.1, whatever the client spoke.
    let mut origin_form = Ok(());
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        origin_form = to_origin_form(req.uri_mut());
    }
    *req.version_mut() = Version::HTTP_11;
    let (host, bad_host) = match host {
        Ok(h) => (Some(h), Ok(())),
        Err(why) => (None, Err(why)),
    };
    if stray_asterisk {
        origin_form = Err("an asterisk target outside OPTIONS");
    } else if odd_scheme {
        origin_form = Err("a scheme other than http or https");
    } else if padded {
        origin_form = Err("a field value with whitespace around it");
    }
    let refusal = match (framing, bad_host, origin_form) {
        _ if too_many => Some(ProxyError::TooManyFields),
        (Err(BadFraming::UnknownCoding), _, _) => Some(ProxyError::NotImplemented(
            BadFraming::UnknownCoding.reason(),
        )),
        (Err(e), _, _) => Some(ProxyError::BadRequest(e.reason())),
        (_, Err(why), _) | (_, _, Err(why)) => Some(ProxyError::BadRequest(why)),
        _ => None,
    };
    Prepared {
        request_id,
        host,
        refusal,
    }
}

/// Rewrites an absolute-form target (or HTTP/2's scheme and authority) to origin form:
/// the path and query, with the path `/` where the target had none (`http://a?x=1`);
/// `*` stays as it is.
fn to_origin_form(uri: &mut Uri) -> Result<(), &'static str> {
    let pq = uri.path_and_query().map_or("", |pq| pq.as_str());
    // `*` is `OPTIONS *` over HTTP/2 (`:path` `*`), the asterisk form in HTTP/1.1.
    let origin = if pq.starts_with('/') || pq == "*" {
        pq.parse::<Uri>()
    } else {
        format!("/{pq}").parse::<Uri>()
    };
    *uri = origin.map_err(|_| "a target with no origin form")?;
    Ok(())
}

/// Joins HTTP/2's separate `cookie` fields into one, as HTTP/1.1 needs them (RFC 9113
/// §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for (i, c) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(c.as_bytes());
    }
    // Each part was a valid value, and so is the whole.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Checks a backend's response head and rewrites it for the client: hop-by-hop fields
/// go (`switching`: but `Upgrade`, for a `101`), framing is settled, and a `204` loses
/// any `Content-Length`. A status outside 100..=599 is no HTTP status a client should
/// be given. Returns whether the backend's connection may carry another response: not
/// after a `204` that announced a length, whose bytes, if the backend sends them, would
/// be read as the next response.
pub fn prepare_response(
    status: StatusCode,
    headers: &mut HeaderMap,
    switching: bool,
) -> Result<bool, &'static str> {
    if status.as_u16() > 599 {
        return Err("a status above 599");
    }
    let bodiless = status == StatusCode::NO_CONTENT || status.is_informational();
    // Read before the fields go: whatever announced a body to come.
    let reusable = !bodiless
        || (headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .all(|v| v == "0")
            && !headers.contains_key(header::TRANSFER_ENCODING));
    strip_hop_by_hop(headers, switching).map_err(BadFraming::reason)?;
    if bodiless {
        // These have no body, and no length (RFC 9110 §8.6): an HTTP/2 client would
        // take a length beside no data for a malformed response.
        headers.remove(header::CONTENT_LENGTH);
    }
    Ok(reusable)
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

/// A client's address, with its text as `X-Forwarded-For` carries it: written once per
/// client connection rather than for each of its requests, whose fields then share it.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    ip: IpAddr,
    text: HeaderValue,
}

impl ClientAddr {
    pub fn new(ip: IpAddr) -> Self {
        let mut buf = [0u8; MAX_IP_TEXT];
        let len = write_ip(ip, &mut buf).len();
        let text = HeaderValue::from_maybe_shared(Bytes::from_owner(IpText { buf, len }))
            .expect("an IP address is a valid header value");
        ClientAddr { ip, text }
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client: &ClientAddr) {
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(e) => {
            e.insert(client.text.clone());
        }
        Entry::Occupied(mut e) => {
            let mut joined = Vec::new();
            for prior in e.iter().filter_map(|v| v.to_str().ok()) {
                joined.extend_from_slice(prior.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client.text.as_bytes());
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
            "a.example:65535",
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
            "a.example:65536",
            "a.example:99999",
            "a.example:000080",
            "[::1]:65536",
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
        strip_hop_by_hop(&mut h, false).unwrap();
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        // A byte outside ASCII in the same value hides no name from it.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, \xe9").unwrap(),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false).unwrap();
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn upgrade_keeps_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h, Version::HTTP_11));
        assert!(!is_upgrade(&h, Version::HTTP_2));
        strip_hop_by_hop(&mut h, true).unwrap();
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn h2c_is_no_upgrade_and_a_101_must_name_what_was_asked() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_upgrade(&h, Version::HTTP_11));

        let asked = HeaderValue::from_static("foo/2, WebSocket");
        let answer = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::UPGRADE, HeaderValue::from_static(v));
            h
        };
        assert!(upgrade_agreed(&asked, &answer("websocket")));
        assert!(upgrade_agreed(&asked, &answer("FOO/2")));
        assert!(!upgrade_agreed(&asked, &answer("h2c")));
        assert!(!upgrade_agreed(&asked, &answer("websocket, h2c")));
        assert!(!upgrade_agreed(&asked, &answer("")));
        assert!(!upgrade_agreed(&asked, &HeaderMap::new()));
    }

    fn framed(fields: &[(&'static str, &'static str)]) -> (Result<(), BadFraming>, HeaderMap) {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_static(v));
        }
        (strip_hop_by_hop(&mut h, false), h)
    }

    #[test]
    fn content_length_is_left_as_one_plain_number() {
        for (fields, want) in [
            (&[("content-length", "5")][..], "5"),
            (&[("content-length", "0")][..], "0"),
            (&[("content-length", "005")][..], "5"),
            (&[("content-length", "00")][..], "0"),
            (&[("content-length", "5, 5")][..], "5"),
            (&[("content-length", "5"), ("content-length", "5")][..], "5"),
        ] {
            let (r, h) = framed(fields);
            assert_eq!(r, Ok(()), "{fields:?}");
            let all: Vec<_> = h.get_all(header::CONTENT_LENGTH).iter().collect();
            assert_eq!(all, [want], "{fields:?}");
        }
        for fields in [
            &[("content-length", "5, 6")][..],
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("content-length", "+5")][..],
            &[("content-length", "")][..],
            &[("content-length", "5,")][..],
            &[("content-length", "18446744073709551616")][..],
        ] {
            assert_eq!(framed(fields).0, Err(BadFraming::Length), "{fields:?}");
        }
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_refused() {
        for ok in ["chunked", "Chunked"] {
            let (r, h) = framed(&[("transfer-encoding", ok), ("content-length", "5, 6")]);
            assert_eq!(r, Ok(()), "{ok}");
            assert!(h.is_empty(), "{ok}: {h:?}");
        }
        for bad in [
            "gzip, chunked",
            "gzip",
            "chunked, x",
            "",
            "identity",
            "identity, chunked",
            "chunked, chunked",
        ] {
            let (r, _) = framed(&[("transfer-encoding", bad)]);
            assert_eq!(r, Err(BadFraming::UnknownCoding), "{bad}");
        }
    }

    #[test]
    fn targets_become_origin_form() {
        for (target, want) in [
            ("http://a.example/x?y=1", "/x?y=1"),
            ("http://a.example?x=1", "/?x=1"),
            ("http://a.example", "/"),
        ] {
            let mut uri: Uri = target.parse().unwrap();
            to_origin_form(&mut uri).unwrap();
            assert_eq!(uri, want, "{target}");
        }
        // HTTP/2's `OPTIONS *`: scheme, authority and the path `*`.
        let mut uri = Uri::builder()
            .scheme("http")
            .authority("a.example")
            .path_and_query("*")
            .build()
            .unwrap();
        to_origin_form(&mut uri).unwrap();
        assert_eq!(uri, "*");
    }

    #[test]
    fn separate_cookie_fields_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h[header::COOKIE], "a=1");
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
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
        let client = ClientAddr::new("10.0.0.7".parse().unwrap());
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &client);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.7");
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        append_forwarded_for(&mut h, &client);
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
        strip_hop_by_hop(&mut h, false).unwrap();
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
