//! Per-request affinity: which backends to try, in what order, and what to tell the
//! client afterwards (a sticky cookie) or to learn from the response (a session cookie).
//!
//! A [`Plan`] yields member indices: first the backend the client's affinity points at
//! (cookie, learned session, hash key owner), then fallbacks (balanced new assignment,
//! or the key's rendezvous ranking), never one twice.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use cookie::{Cookie, SameSite as CookieSameSite};
use http::header::{HeaderMap, HeaderValue, COOKIE, SET_COOKIE};
use http::StatusCode;

use crate::balance::consistent_hash::{self, weighted_load_cap};
use crate::balance::key::{self, RequestHead};
use crate::balance::learned::Lookup;
use crate::balance::sticky_cookie::Verdict;
use crate::config::{AllDown, OnUnavailable, SameSite, SecureMode};
use crate::pool::{Affinity, Member, Outcome, Pool};

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The order of backends to try for one request, and the affinity bookkeeping.
#[derive(Debug)]
pub struct Plan {
    /// The member the client's affinity points at, tried first.
    pinned: Option<usize>,
    pinned_done: bool,
    rest: Rest,
    /// `None` for stateless pools.
    pub outcome: Option<Outcome>,
    /// A failed pinned backend means 503 rather than another backend.
    reject_if_pinned_fails: bool,
    /// Re-issue the sticky cookie even on a hit (sliding expiry).
    renew: bool,
    /// The pinned backend is down and the pool rejects: answer 503 at once.
    pub reject_now: bool,
    /// Candidates offered so far (after the pinned one).
    offered: usize,
    /// No backend was healthy and the pool fails open: health is ignored.
    ignore_health: bool,
    /// The first healthy candidate passed over for a preference (slow start, bounded
    /// load, a draining fallback): used if nothing else is.
    passed_over: Option<usize>,
    /// Balancing orders drawn again (see [`Plan::draw_again`]).
    redraws: u8,
    /// A plan made to show where a request would go, not for one: it counts nothing.
    probe: bool,
}

/// How many times a request's balancing order is drawn again when its pick is passed
/// over before any backend was tried. With a quarter of the pool out, the last draw
/// still hits one of those with a chance of 4^-8; the order then goes on in list order.
const MAX_REDRAWS: u8 = 8;

/// The longest session value a request brings that a `sticky_learn` pool binds when it
/// does not know it (session ids are 16 to 64 characters; Tomcat's with a route suffix
/// some more).
const MAX_UNKNOWN_SESSION: usize = 128;

#[derive(Debug)]
enum Rest {
    /// Balanced over eligible members: the selector's order.
    Balanced {
        order: Option<crate::balance::Candidates>,
        /// For `sticky_learn`: the session value the request carries, to be bound to
        /// the backend that serves it (see `rebind`), or forgotten if the response
        /// clears the cookie. Kept here, where the ranked variant already takes the
        /// room, so that a plan is no larger to move.
        session: Option<Box<str>>,
        /// Whether to bind the session to the backend that serves it.
        rebind: Rebind,
    },
    /// The rendezvous ranking of a hash key, computed on first use; members at or over
    /// their bounded-load cap are passed over.
    Ranked {
        key_hash: u64,
        order: Option<Vec<usize>>,
        pos: usize,
        bound: Option<Bound>,
    },
}

/// Whether a `sticky_learn` request's session is bound to the backend that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rebind {
    No,
    /// Its backend is down, ejected or gone (not after a failed connect alone, which a
    /// backend still up may have).
    Redispatched,
    /// The table does not hold it (never seen, or expired): bound only while the table
    /// has room, as no backend vouched for it.
    Unknown,
}

/// Bounded load (`c`) with the in-flight total and weight of the members that take new
/// requests (healthy, not draining), taken when the plan was made.
#[derive(Debug, Clone, Copy)]
struct Bound {
    c: f64,
    total: usize,
    total_weight: u64,
}

impl Bound {
    /// Whether `m` is below its cap (always, without a bound).
    fn admits(bound: Option<Bound>, m: &Member) -> bool {
        bound.is_none_or(|b| {
            m.backend.in_flight() < weighted_load_cap(b.c, b.total, m.weight, b.total_weight)
        })
    }
}

/// Why a plan ended without a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The pinned backend failed and the pool rejects rather than redispatches.
    Rejected,
}

impl Plan {
    /// The next member to try.
    pub fn next(&mut self, pool: &Pool) -> Option<usize> {
        if !self.pinned_done {
            self.pinned_done = true;
            if let Some(p) = self.pinned {
                return Some(p);
            }
        }
        loop {
            let ignore_health = self.ignore_health;
            let ok = |i: usize| pool.usable(i) && (ignore_health || pool.healthy(i));
            let next = match &mut self.rest {
                Rest::Balanced { order: c, .. } => {
                    let c = c.get_or_insert_with(|| pool.selector_candidates(false, ignore_health));
                    let next = c.next().and_then(|k| pool.eligible.get(k).copied());
                    match next {
                        // Drawn again after it was passed over: it stays the fallback.
                        Some(i) if self.passed_over == Some(i) => {
                            self.draw_again(pool);
                            continue;
                        }
                        // Slow start: pass a ramping backend over, by chance, once.
                        Some(i) if ok(i) && self.passed_over.is_none() && pool.ramping_skip(i) => {
                            self.passed_over = Some(i);
                            self.draw_again(pool);
                            continue;
                        }
                        _ => next.map(|i| (i, ok(i))),
                    }
                }
                Rest::Ranked {
                    key_hash,
                    order,
                    pos,
                    bound,
                } => {
                    let Affinity::Hash { table, .. } = &pool.affinity else {
                        return None;
                    };
                    let order = order.get_or_insert_with(|| table.ranking(*key_hash));
                    match order.get(*pos).copied() {
                        None => None,
                        Some(i) => {
                            *pos += 1;
                            // Preferred: under its bounded-load cap, and, for a key whose
                            // owner is out, a backend that takes new clients. Both are
                            // preferences: if no candidate meets them, the first healthy
                            // one passed over serves rather than a 503.
                            let m = &pool.members[i];
                            let fallback = Some(i) != table.owner(*key_hash);
                            let preferred = !(fallback && m.draining) && Bound::admits(*bound, m);
                            if ok(i) && !preferred {
                                if self.passed_over.is_none() && Some(i) != self.pinned {
                                    self.passed_over = Some(i);
                                }
                                continue;
                            }
                            Some((i, ok(i)))
                        }
                    }
                }
            };
            match next {
                Some((i, true)) if Some(i) != self.pinned => {
                    self.offered += 1;
                    return Some(i);
                }
                Some(_) => {
                    self.draw_again(pool);
                    continue;
                }
                None if self.passed_over.is_some() && self.passed_over != self.pinned => {
                    self.offered += 1;
                    return self.passed_over.take();
                }
                None => {
                    // Nothing healthy at all: fail open once, if the pool says so (not
                    // when every backend drains: then none may take new clients).
                    if self.offered > 0
                        || self.ignore_health
                        || self.pinned.is_some()
                        || pool.all_down != AllDown::FailOpen
                        || pool.eligible.is_empty()
                    {
                        return None;
                    }
                    self.ignore_health = true;
                    if !self.probe {
                        pool.state.fail_open.fetch_add(1, Ordering::Relaxed);
                    }
                    match &mut self.rest {
                        // Drawn afresh: a round robin's next turn would be the next
                        // request's too, and with an even cycle one backend would take
                        // them all.
                        Rest::Balanced { order, .. } => {
                            *order = Some(pool.selector_candidates(true, true));
                        }
                        Rest::Ranked { pos, .. } => *pos = 0,
                    }
                }
            }
        }
    }

    /// Draws the balancing order again, if no balanced candidate was offered yet: the
    /// share of a backend that is out (or passed over in slow start) then goes to the
    /// others as they are balanced, rather than all to the one after it in the list.
    /// Once a candidate was tried, the order goes on as it is, so that no backend is
    /// offered twice.
    fn draw_again(&mut self, pool: &Pool) {
        if self.offered > 0 || self.redraws >= MAX_REDRAWS {
            return;
        }
        if let Rest::Balanced { order, .. } = &mut self.rest {
            self.redraws += 1;
            *order = Some(pool.selector_candidates(true, self.ignore_health));
        }
    }

    /// Called when member `i` could not be reached. Returns `Err` when the plan must stop.
    pub fn failed(&mut self, i: usize) -> Result<(), Stop> {
        if Some(i) == self.pinned {
            if self.reject_if_pinned_fails {
                self.outcome = Some(Outcome::Rejected);
                return Err(Stop::Rejected);
            }
            if self.outcome.is_some() {
                self.outcome = Some(Outcome::Redispatched);
            }
        }
        Ok(())
    }

    /// The learned session value the request carries, if any.
    fn session(&self) -> Option<&str> {
        match &self.rest {
            Rest::Balanced { session, .. } => session.as_deref(),
            Rest::Ranked { .. } => None,
        }
    }

    /// Whether the request's learned session is to be bound to the backend that serves it.
    fn rebind(&self) -> Rebind {
        match self.rest {
            Rest::Balanced { rebind, .. } => rebind,
            Rest::Ranked { .. } => Rebind::No,
        }
    }

    /// Whether member `i` is the one the client's affinity points at.
    pub fn is_pinned(&self, i: usize) -> bool {
        self.pinned == Some(i)
    }

    /// Whether the client must get a (new) sticky cookie for the backend that served it.
    pub fn issue_cookie(&self) -> bool {
        self.renew || !matches!(self.outcome, Some(Outcome::Hit))
    }
}

impl Pool {
    /// Decides where one request goes.
    pub fn plan(&self, req: &impl RequestHead, client: IpAddr) -> Plan {
        let mut plan = self.empty_plan();
        // Each policy's work is out of line: the request path of a pool without
        // affinity, or with another kind, then spans fewer cache lines.
        match &self.affinity {
            Affinity::None => {}
            Affinity::Cookie { .. } => self.plan_cookie(&mut plan, req),
            Affinity::Learn { .. } => self.plan_learned(&mut plan, req),
            Affinity::Hash { .. } => self.plan_hash(&mut plan, req, client),
        }
        plan
    }

    fn empty_plan(&self) -> Plan {
        Plan {
            pinned: None,
            pinned_done: false,
            rest: Rest::Balanced {
                order: None,
                session: None,
                rebind: Rebind::No,
            },
            outcome: None,
            reject_if_pinned_fails: false,
            renew: false,
            reject_now: false,
            offered: 0,
            ignore_health: false,
            passed_over: None,
            redraws: 0,
            probe: false,
        }
    }

    /// Whether a client pinned to member `i` goes there: it is healthy, or, with no
    /// backend of the pool healthy and the pool failing open, it is usable still. Failing
    /// open routes as if all were healthy, pinned clients included: with every health
    /// check failing at once (the case failing open is for), they stay where they are,
    /// rather than get `503` or scatter. The plan then fails open (and counts in
    /// `switchyard_pool_fail_open_total`): should the pinned backend fail, the client
    /// is redispatched as if all were healthy.
    fn pinnable(&self, i: usize, plan: &mut Plan) -> bool {
        if self.healthy(i) {
            return true;
        }
        let open = self.usable(i)
            && self.all_down == AllDown::FailOpen
            && !self.eligible.iter().any(|&k| self.healthy(k));
        if open {
            plan.ignore_health = true;
            self.state.fail_open.fetch_add(1, Ordering::Relaxed);
        }
        open
    }

    #[inline(never)]
    fn plan_cookie(&self, plan: &mut Plan, req: &impl RequestHead) {
        let Affinity::Cookie { cfg, codec, tags } = &self.affinity else {
            return;
        };
        let now = unix_now() as u32;
        let mut outcome = Outcome::New;
        for value in key::cookie_values(req, &cfg.cookie) {
            match codec.decode(value, now) {
                Verdict::Invalid => outcome = Outcome::Invalid,
                Verdict::Expired => outcome = Outcome::Expired,
                Verdict::Valid { key, tag, expires } => {
                    // A backend that left the configuration hands its clients on
                    // even under `reject`: it is not coming back.
                    let reject = |i: usize| {
                        cfg.on_unavailable == OnUnavailable::Reject && !self.members[i].removed
                    };
                    match tags[key].get(&tag).copied().filter(|&i| self.usable(i)) {
                        Some(i) if !self.pinnable(i, plan) => {
                            if reject(i) {
                                plan.reject_now = true;
                                outcome = Outcome::Rejected;
                            } else {
                                outcome = Outcome::Redispatched;
                            }
                        }
                        Some(i) => {
                            plan.pinned = Some(i);
                            outcome = Outcome::Hit;
                            plan.reject_if_pinned_fails = reject(i);
                            // Renewed when sliding and half its ttl has passed, and
                            // when it outlives the ttl, as a cookie issued before the
                            // ttl was lowered does: it then ends within the new one.
                            // A minute's leeway spares cookies from proxies sharing
                            // the secret whose clocks are a little ahead.
                            let left = u64::from(expires).saturating_sub(u64::from(now));
                            let ttl = cfg.ttl.as_secs();
                            plan.renew = left > ttl + 60 || (cfg.sliding && left < ttl / 2);
                        }
                        None => outcome = Outcome::Redispatched,
                    }
                    break;
                }
            }
        }
        plan.outcome = Some(outcome);
    }

    #[inline(never)]
    fn plan_learned(&self, plan: &mut Plan, req: &impl RequestHead) {
        let Affinity::Learn { cfg } = &self.affinity else {
            return;
        };
        let mut outcome = Outcome::New;
        if let (Some(value), Some(table)) =
            (key::cookie_value(req, &cfg.cookie), self.state.learned())
        {
            // Whether the session is to be bound to the backend that serves it: a known
            // one whose backend is down, ejected or gone, and an unknown or expired one
            // (an application that does not set its cookie again, as with a session in
            // a shared store, would otherwise see the client's requests balanced one by
            // one). Values no backend set are bound only while the table has room
            // (a client making them up cannot push out sessions backends set), and
            // only as long as a session id (longer ones are balanced alone).
            let found = table.lookup(value, unix_now());
            let rebind = match &found {
                Lookup::Hit(id) => {
                    let pinned = self
                        .by_id
                        .get(id)
                        .copied()
                        .filter(|&i| self.pinnable(i, plan));
                    match pinned {
                        Some(i) => {
                            plan.pinned = Some(i);
                            outcome = Outcome::Hit;
                        }
                        None => outcome = Outcome::Redispatched,
                    }
                    if pinned.is_none() {
                        Rebind::Redispatched
                    } else {
                        Rebind::No
                    }
                }
                Lookup::Expired | Lookup::Unknown => {
                    if matches!(found, Lookup::Expired) {
                        outcome = Outcome::Expired;
                    }
                    if value.len() <= MAX_UNKNOWN_SESSION {
                        Rebind::Unknown
                    } else {
                        Rebind::No
                    }
                }
            };
            if let Rest::Balanced {
                session, rebind: r, ..
            } = &mut plan.rest
            {
                *session = Some(value.into());
                *r = rebind;
            }
        }
        plan.outcome = Some(outcome);
    }

    #[inline(never)]
    fn plan_hash(&self, plan: &mut Plan, req: &impl RequestHead, client: IpAddr) {
        let Affinity::Hash { cfg, .. } = &self.affinity else {
            return;
        };
        match key::extract(&cfg.key, req, client) {
            None => plan.outcome = Some(Outcome::New),
            Some(k) => self.plan_hash_key(plan, consistent_hash::hash_key(&k)),
        }
    }

    /// Plans for a key hashing to `key_hash`: its owner first, if it is healthy and
    /// under its bounded-load cap, then the key's ranking.
    fn plan_hash_key(&self, plan: &mut Plan, key_hash: u64) {
        let Affinity::Hash { cfg, table } = &self.affinity else {
            return;
        };
        let bound = cfg.bounded_load.map(|c| {
            // Over the backends that take new requests: the caps of the others
            // would leave less room than there is load, and the owner would
            // take the rest beyond its own.
            let open =
                (0..self.members.len()).filter(|&i| self.healthy(i) && !self.members[i].draining);
            let (total, total_weight) = open.fold((0, 0), |(t, w), i| {
                let m = &self.members[i];
                (t + m.backend.in_flight(), w + u64::from(m.weight))
            });
            Bound {
                c,
                total,
                total_weight,
            }
        });
        let owner = table
            .owner(key_hash)
            .filter(|&i| self.healthy(i) && Bound::admits(bound, &self.members[i]));
        plan.outcome = Some(if owner.is_some() {
            Outcome::Hit
        } else {
            Outcome::Redispatched
        });
        plan.pinned = owner;
        plan.rest = Rest::Ranked {
            key_hash,
            order: None,
            pos: 0,
            bound,
        };
    }

    /// For a consistent_hash pool: the member a request with `key` would go to now
    /// (health and bounded load as they are at this instant), if any; `None` for
    /// other pools.
    pub fn hash_serving(&self, key: &[u8]) -> Option<Option<usize>> {
        let Affinity::Hash { .. } = &self.affinity else {
            return None;
        };
        let mut plan = self.empty_plan();
        plan.probe = true;
        self.plan_hash_key(&mut plan, consistent_hash::hash_key(key));
        Some(plan.next(self))
    }

    /// For a consistent_hash pool: the members in the order `key` would try them now
    /// (owner first), skipping drained-out ones; `None` for other pools.
    pub fn hash_candidates(&self, key: &[u8]) -> Option<Vec<usize>> {
        let Affinity::Hash { table, .. } = &self.affinity else {
            return None;
        };
        let order = table.ranking(consistent_hash::hash_key(key));
        Some(order.into_iter().filter(|&i| self.usable(i)).collect())
    }

    /// The `Set-Cookie` value pinning a client to member `i`.
    #[inline(never)]
    pub fn sticky_cookie(&self, i: usize, tls: bool) -> Option<HeaderValue> {
        let Affinity::Cookie { cfg, codec, .. } = &self.affinity else {
            return None;
        };
        let ttl = cfg.ttl.as_secs();
        let expires = (unix_now() + ttl).min(u64::from(u32::MAX)) as u32;
        let value = codec.encode(&self.members[i].backend.id, expires);
        let mut c = Cookie::build((cfg.cookie.as_str(), value))
            .path(cfg.path.as_str())
            .max_age(cookie::time::Duration::seconds(ttl as i64))
            .http_only(cfg.http_only)
            .same_site(match cfg.same_site {
                SameSite::Lax => CookieSameSite::Lax,
                SameSite::Strict => CookieSameSite::Strict,
                SameSite::None => CookieSameSite::None,
            })
            .secure(match cfg.secure {
                _ if cfg.same_site == SameSite::None => true,
                SecureMode::Auto => tls,
                SecureMode::Always => true,
                SecureMode::Never => false,
            });
        if let Some(d) = &cfg.domain {
            c = c.domain(d.as_str());
        }
        HeaderValue::from_str(&c.build().to_string()).ok()
    }

    /// Learns from a response of member `i` (with `status`) the session cookie it set
    /// or cleared. A session the request carries that is unknown, expired, or whose
    /// backend is down, ejected or gone, and that the response does not replace, is
    /// bound to member `i` unless it answered with a server error: it would otherwise
    /// be balanced anew on every request.
    #[inline(never)]
    pub fn learn_from(&self, i: usize, status: StatusCode, headers: &HeaderMap, plan: &Plan) {
        let (Affinity::Learn { cfg }, Some(table)) = (&self.affinity, self.state.learned()) else {
            return;
        };
        if !self.state.learning.load(Ordering::Relaxed) {
            return;
        }
        let backend = &self.members[i].backend.id;
        let mut set: Vec<String> = Vec::new();
        let mut clears: Vec<String> = Vec::new();
        let mut named = false;
        for v in headers.get_all(SET_COOKIE) {
            let Some((raw, c)) = v
                .to_str()
                .ok()
                .and_then(|s| Some((s, Cookie::parse(s).ok()?)))
            else {
                continue;
            };
            if c.name() != cfg.cookie {
                continue;
            }
            named = true;
            let value = key::cookie_key(c.value());
            if cleared(raw, &c, value) {
                clears.push(value.to_owned());
            } else {
                set.push(value.to_owned());
            }
        }
        // Forgets first, and never of a value the same response sets (a cookie cleared
        // on an old path and set on a new one).
        if !clears.is_empty() {
            // `JSESSIONID=; Max-Age=0` names no session: the request's is the one that
            // ends.
            let ended = plan.session().map(str::to_owned);
            for value in clears.iter().chain(&ended) {
                if !value.is_empty() && !set.contains(value) {
                    table.forget(value);
                }
            }
        }
        for value in &set {
            table.learn(value, backend, unix_now());
        }
        if let (false, Some(session), false) = (named, plan.session(), status.is_server_error()) {
            match plan.rebind() {
                Rebind::No => {}
                Rebind::Redispatched => table.learn(session, backend, unix_now()),
                Rebind::Unknown => table.learn_if_room(session, backend, unix_now()),
            }
        }
    }
}

/// Whether a `Set-Cookie` (`raw`, parsed as `c`) clears its cookie: an empty value, a
/// `Max-Age` of zero or less, or, without `Max-Age` (which takes precedence, RFC 6265
/// §5.3), an `Expires` in the past (`JSESSIONID=deleted; Expires=Thu, 01 Jan 1970
/// 00:00:00 GMT`).
fn cleared(raw: &str, c: &Cookie<'_>, value: &str) -> bool {
    value.is_empty()
        || match max_age_ends_now(raw) {
            Some(ends) => ends,
            None => c
                .expires_datetime()
                .is_some_and(|t| t.unix_timestamp() <= unix_now() as i64),
        }
}

/// Whether the last valid `Max-Age` of a `Set-Cookie` ends the cookie now (zero or
/// less); `None` without a valid one. Valid as RFC 6265 §5.2.2 says, which browsers
/// follow: an optional `-`, then digits only. Read here rather than by the `cookie`
/// crate, which takes an empty `Max-Age=` for the longest age, where browsers ignore it
/// (and then honour an `Expires` in the past).
fn max_age_ends_now(raw: &str) -> Option<bool> {
    raw.split(';')
        .skip(1)
        .filter_map(|av| av.split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("max-age"))
        .filter_map(|(_, v)| {
            let v = v.trim();
            let (negative, digits) = match v.strip_prefix('-') {
                Some(d) => (true, d),
                None => (false, v),
            };
            (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| negative || digits.bytes().all(|b| b == b'0'))
        })
        .last()
}

/// Removes cookie `name` from the request's `Cookie` headers: the proxy's own cookie is
/// not the backend's business. The others go on, in one header, byte for byte.
pub fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    if !key::cookie_pairs(headers).any(|(k, _)| k == name.as_bytes()) {
        return;
    }
    let mut kept = Vec::new();
    for pair in key::cookie_crumbs(headers) {
        let ours = pair
            .iter()
            .position(|&b| b == b'=')
            .is_some_and(|eq| pair[..eq].trim_ascii() == name.as_bytes());
        if pair.is_empty() || ours {
            continue;
        }
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    headers.remove(COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_bytes(&kept) {
            headers.insert(COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `consistent_hash` pool of `a`, `b` and `c` (draining) with `bounded_load`.
    fn bounded_pool() -> crate::runtime::Runtime {
        let config = crate::config::parse(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n\
             [pools.h]\npolicy = \"consistent_hash\"\nhash_key = [\"header:k\"]\n\
             bounded_load = 1.25\nbackends = [\n\
             { address = \"127.0.0.1:1\", id = \"a\" },\n\
             { address = \"127.0.0.1:2\", id = \"b\" },\n\
             { address = \"127.0.0.1:3\", id = \"c\", drain = true },\n]\n",
            "test.toml",
        )
        .unwrap();
        crate::runtime::Runtime::build(config, 1, None)
    }

    #[test]
    fn bounded_load_is_shared_by_the_backends_that_take_new_requests() {
        let rt = bounded_pool();
        let pool = rt.pool("h").unwrap();
        let c = pool.by_id["c"];
        // Sessions pinned to the draining backend: load that no other backend can take,
        // which must not raise the others' caps.
        let pinned: Vec<_> = (0..100)
            .map(|_| pool.members[c].backend.start_request())
            .collect();
        // A key owned by a backend that takes new requests.
        let parts = |key: &str| {
            http::Request::get("/")
                .header("k", key)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let key = (0..)
            .map(|n| format!("user-{n}"))
            .find(|k| pool.hash_candidates(k.as_bytes()).unwrap()[0] != c)
            .unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut held = Vec::new();
        let mut taken = [0usize; 3];
        for t in 0..30usize {
            let mut plan = pool.plan(&parts(&key), ip);
            let i = plan.next(pool).unwrap();
            assert_ne!(i, c, "a draining backend took a new key");
            // The cap over the two that take new requests: ceil(1.25 × (t + 1) / 2).
            let cap = (1.25 * (t + 1) as f64 / 2.0).ceil() as usize;
            assert!(
                pool.members[i].backend.in_flight() < cap,
                "request {t} went to {} at {} in flight, cap {cap}",
                pool.members[i].backend.id,
                pool.members[i].backend.in_flight()
            );
            taken[i] += 1;
            held.push(pool.members[i].backend.start_request());
        }
        // The owner's share beyond its cap went to the other.
        assert!(
            taken[pool.by_id["a"]] > 0 && taken[pool.by_id["b"]] > 0,
            "{taken:?}"
        );
        drop((held, pinned));
    }

    #[test]
    fn cookies_that_clear_are_told_from_those_that_set() {
        let clears = |s: &str| {
            let c = Cookie::parse(s).unwrap();
            cleared(s, &c, key::cookie_key(c.value()))
        };
        assert!(clears("JSESSIONID=; Path=/"));
        assert!(clears("JSESSIONID=x; Max-Age=0"));
        assert!(clears(
            "JSESSIONID=deleted; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        ));
        assert!(!clears("JSESSIONID=x; Path=/"));
        assert!(!clears(
            "JSESSIONID=x; Expires=Fri, 01 Jan 2100 00:00:00 GMT"
        ));
        assert!(!clears(
            "JSESSIONID=x; Max-Age=60; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        ));
        assert!(clears("JSESSIONID=x; max-age=-1"));
        assert!(clears("JSESSIONID=x; Max-Age=60; Max-Age=000"));
        // A `Max-Age` that is not an optional `-` and digits is ignored, as browsers
        // ignore it: an `Expires` in the past then clears.
        for bad in ["", " ", "-", "1d", "+5", "abc"] {
            assert!(
                clears(&format!(
                    "JSESSIONID=deleted; Max-Age={bad}; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
                )),
                "Max-Age={bad:?}"
            );
            assert!(
                !clears(&format!("JSESSIONID=x; Max-Age={bad}")),
                "Max-Age={bad:?}"
            );
        }
        assert!(!clears("JSESSIONID=x; Max-Age=0; Max-Age=60"));
        assert!(clears("JSESSIONID=x; Max-Age=0; Max-Age="));
    }

    #[test]
    fn strip_cookie_keeps_the_others() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; SW=xyz; b=2"));
        h.append(COOKIE, HeaderValue::from_static("SW=other"));
        strip_cookie(&mut h, "SW");
        assert_eq!(h.get_all(COOKIE).iter().count(), 1);
        assert_eq!(h[COOKIE], "a=1; b=2");
        let mut utf8 = HeaderMap::new();
        utf8.insert(
            COOKIE,
            HeaderValue::from_bytes(b"pref=caf\xc3\xa9; SW=xyz; raw=\xe9;bare").unwrap(),
        );
        strip_cookie(&mut utf8, "SW");
        assert_eq!(utf8[COOKIE].as_bytes(), b"pref=caf\xc3\xa9; raw=\xe9; bare");
        let mut only = HeaderMap::new();
        only.insert(COOKIE, HeaderValue::from_static("SW=1"));
        strip_cookie(&mut only, "SW");
        assert!(only.get(COOKIE).is_none());
    }
}
