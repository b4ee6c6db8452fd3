//! The request key for consistent hashing: the first present source of a configured
//! chain such as `["header:X-User-Id", "cookie:uid", "query:user", "client_ip"]`.

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, COOKIE};
use http::request::Parts;
use http::{Request, Uri};

/// What keys are read from: a request's target and fields, whether the request is
/// whole or split into its parts.
pub trait RequestHead {
    fn uri(&self) -> &Uri;
    fn headers(&self) -> &HeaderMap;
}

impl RequestHead for Parts {
    fn uri(&self) -> &Uri {
        &self.uri
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

impl<B> RequestHead for Request<B> {
    fn uri(&self) -> &Uri {
        self.uri()
    }

    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
}

/// Where a key may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(HeaderName),
    Cookie(String),
    Query(String),
    Path,
    ClientIp,
}

impl KeySource {
    /// Parses `header:NAME`, `cookie:NAME`, `query:NAME`, `path` or `client_ip`.
    pub fn parse(s: &str) -> Result<KeySource, String> {
        let bad_name = |what: &str| format!("{what} needs a name, e.g. \"{what}:X-User-Id\"");
        match s.split_once(':') {
            None if s == "path" => Ok(KeySource::Path),
            None if s == "client_ip" => Ok(KeySource::ClientIp),
            Some(("header", name)) if !name.is_empty() => HeaderName::from_bytes(name.as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("invalid header name {name:?}")),
            Some(("cookie", name)) if !name.is_empty() => {
                if is_cookie_name(name) {
                    Ok(KeySource::Cookie(name.to_owned()))
                } else {
                    Err(format!("invalid cookie name {name:?}"))
                }
            }
            Some(("query", name)) if !name.is_empty() => Ok(KeySource::Query(name.to_owned())),
            Some((what @ ("header" | "cookie" | "query"), _)) => Err(bad_name(what)),
            _ => Err(format!(
                "unknown key source {s:?}; expected header:NAME, cookie:NAME, query:NAME, path or client_ip"
            )),
        }
    }

    /// This source's value in a request, if present and non-empty.
    pub fn extract<'a>(&self, req: &'a impl RequestHead, client: IpAddr) -> Option<Cow<'a, [u8]>> {
        match self {
            KeySource::Header(name) => req
                .headers()
                .get(name)
                .map(|v| Cow::Borrowed(v.as_bytes()))
                .filter(|v| !v.is_empty()),
            KeySource::Cookie(name) => cookie_bytes(req, name).map(Cow::Borrowed),
            KeySource::Query(name) => req
                .uri()
                .query()
                .and_then(|q| query_value(q, name))
                .map(Cow::Owned),
            KeySource::Path => Some(Cow::Borrowed(req.uri().path().as_bytes())),
            KeySource::ClientIp => Some(Cow::Owned(client_ip_key(client))),
        }
    }
}

/// The first non-empty value of query parameter `name` in `query`, decoded as an HTML
/// form encodes it (`+` for a space, `%XX` for a byte) to bytes, not to text: values
/// that are not UTF-8 stay apart, as `header:` and `cookie:` keys do, rather than all
/// turn into the same replacement characters.
pub fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    fn decoded(s: &str) -> Vec<u8> {
        let spaced = s.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced).collect()
    }
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (!v.is_empty() && decoded(k) == name.as_bytes())
            .then(|| decoded(v))
            .filter(|v| !v.is_empty())
    })
}

/// The key of a client address: its octets (an IPv4 address mapped into IPv6 as the
/// IPv4 address).
pub fn client_ip_key(client: IpAddr) -> Vec<u8> {
    match client.to_canonical() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An RFC 6265 cookie-name (an RFC 9110 token).
pub fn is_cookie_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The `name=value` pairs of the request's `Cookie` headers, in order, as bytes: a
/// header with bytes outside ASCII (browsers send UTF-8 in cookie values) still yields
/// its other cookies. The name comes trimmed, the value as sent up to the next `;`.
pub fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    cookie_crumbs(headers).filter_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        Some((pair[..eq].trim_ascii(), &pair[eq + 1..]))
    })
}

/// The `;`-separated parts of the request's `Cookie` headers, in order and trimmed, as
/// bytes: `name=value` pairs, and whatever else a client sent.
pub fn cookie_crumbs(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .map(<[u8]>::trim_ascii)
}

/// Cookie `name`'s value in one pair from [`cookie_pairs`], as [`cookie_key`] gives it,
/// if it is that cookie's, non-empty and UTF-8.
fn matching<'a>((k, v): (&[u8], &'a [u8]), name: &str) -> Option<&'a str> {
    if k != name.as_bytes() {
        return None;
    }
    let v = cookie_key(std::str::from_utf8(v).ok()?);
    (!v.is_empty()).then_some(v)
}

/// Every value of cookie `name` in the request's `Cookie` headers, in order.
pub fn cookie_values<'a>(req: &'a impl RequestHead, name: &str) -> Vec<&'a str> {
    cookie_pairs(req.headers())
        .filter_map(|pair| matching(pair, name))
        .collect()
}

/// The first non-empty value of cookie `name`.
pub fn cookie_value<'a>(req: &'a impl RequestHead, name: &str) -> Option<&'a str> {
    cookie_pairs(req.headers()).find_map(|pair| matching(pair, name))
}

/// The first non-empty value of cookie `name` as bytes, without surrounding whitespace
/// or double quotes: a hash key, which needs no text (a value outside UTF-8 is a key
/// all the same).
fn cookie_bytes<'a>(req: &'a impl RequestHead, name: &str) -> Option<&'a [u8]> {
    cookie_pairs(req.headers()).find_map(|(k, v)| {
        if k != name.as_bytes() {
            return None;
        }
        let mut v = v.trim_ascii();
        while let [b'"', rest @ ..] = v {
            v = rest;
        }
        while let [rest @ .., b'"'] = v {
            v = rest;
        }
        (!v.is_empty()).then_some(v)
    })
}

/// A cookie value as affinity compares it, whether read from a request's `Cookie` or
/// learned from a response's `Set-Cookie`: without surrounding whitespace or the double
/// quotes that RFC 6265 allows around it.
pub fn cookie_key(value: &str) -> &str {
    value.trim().trim_matches('"')
}

/// The first present key of `chain`.
pub fn extract<'a>(
    chain: &[KeySource],
    req: &'a impl RequestHead,
    client: IpAddr,
) -> Option<Cow<'a, [u8]>> {
    chain.iter().find_map(|s| s.extract(req, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn chain(spec: &[&str]) -> Vec<KeySource> {
        spec.iter().map(|s| KeySource::parse(s).unwrap()).collect()
    }

    #[test]
    fn first_present_source_wins() {
        let c = chain(&["header:X-User-Id", "cookie:uid", "query:user", "client_ip"]);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let p = parts(
            "/a?user=q1",
            &[("cookie", "x=1; uid=c1"), ("x-user-id", "h1")],
        );
        assert_eq!(extract(&c, &p, ip).unwrap().as_ref(), b"h1");
        let p = parts("/a?user=q1", &[("cookie", "x=1; uid=c1")]);
        assert_eq!(extract(&c, &p, ip).unwrap().as_ref(), b"c1");
        let p = parts("/a?other=1&user=q%201", &[]);
        assert_eq!(extract(&c, &p, ip).unwrap().as_ref(), b"q 1");
        let p = parts("/a", &[("x-user-id", "")]);
        assert_eq!(extract(&c, &p, ip).unwrap().as_ref(), &[10, 1, 2, 3]);
    }

    #[test]
    fn cookies_are_found_beside_values_outside_ascii() {
        let mut p = parts("/", &[]);
        p.headers.insert(
            COOKIE,
            http::HeaderValue::from_bytes(b"pref=caf\xc3\xa9; uid=\"u1\"; latin=\xe9").unwrap(),
        );
        p.headers.append(
            COOKIE,
            http::HeaderValue::from_bytes(b"x=\xff; uid=u2").unwrap(),
        );
        assert_eq!(cookie_value(&p, "uid"), Some("u1"));
        assert_eq!(cookie_values(&p, "uid"), ["u1", "u2"]);
        assert_eq!(cookie_value(&p, "pref"), Some("caf\u{e9}"));
        assert_eq!(cookie_value(&p, "x"), None);
        let c = chain(&["cookie:uid", "client_ip"]);
        assert_eq!(
            extract(&c, &p, "::1".parse().unwrap()).unwrap().as_ref(),
            b"u1"
        );
        // A hash key needs no text: a value outside UTF-8 is a key, as it is.
        let c = chain(&["cookie:latin", "client_ip"]);
        assert_eq!(
            extract(&c, &p, "::1".parse().unwrap()).unwrap().as_ref(),
            b"\xe9"
        );
    }

    #[test]
    fn absent_chain_gives_none() {
        let c = chain(&["header:X-User-Id", "query:user"]);
        assert!(extract(&c, &parts("/", &[]), "::1".parse().unwrap()).is_none());
    }

    #[test]
    fn parse_errors_are_explained() {
        assert!(KeySource::parse("header:")
            .unwrap_err()
            .contains("needs a name"));
        assert!(KeySource::parse("header:bad name")
            .unwrap_err()
            .contains("invalid header"));
        assert!(KeySource::parse("ip")
            .unwrap_err()
            .contains("unknown key source"));
        assert_eq!(KeySource::parse("path").unwrap(), KeySource::Path);
    }

    #[test]
    fn query_values_decode_to_bytes() {
        let q = "a=1&user=&user=tok%80&x=y";
        assert_eq!(query_value(q, "user").unwrap(), b"tok\x80");
        // Bytes outside UTF-8 stay apart.
        assert_ne!(
            query_value("user=tok%81", "user"),
            query_value("user=tok%82", "user")
        );
        assert_eq!(query_value("us%65r=a+b%2B", "user").unwrap(), b"a b+");
        assert_eq!(query_value("user", "user"), None);
        assert_eq!(query_value("user=", "user"), None);
        assert_eq!(query_value("users=1&user=2", "user").unwrap(), b"2");
        assert_eq!(query_value("", "user"), None);
    }
}
