//! Counting what each source holds: the per-source and total caps on connections, handshakes and calls.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

/// The address a per-source cap counts by: an IPv4 address, or the /64 network of an IPv6 address (one host
/// commonly holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    /// The key of a client address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => SourceKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    SourceKey(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Which cap of a [`Gate`] refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    /// The cap over all sources, with its value.
    Total(usize),
    /// The cap of one source, with its value.
    Source(usize),
}

impl fmt::Display for GateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateRefusal::Total(n) => write!(f, "the cap of {n} over all sources"),
            GateRefusal::Source(n) => write!(f, "the cap of {n} per source address"),
        }
    }
}

/// Counts what is held per source and in total, refusing entries over either cap (a counting semaphore per
/// source and one over all, that never waits).
#[derive(Debug)]
pub struct Gate {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_source: HashMap<SourceKey, usize>,
}

impl Gate {
    /// A gate admitting `max_total` holders, at most `max_per_source` of them from one source.
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            state: Mutex::new(GateState::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters for `source`, or says which cap is full.
    pub fn try_enter(self: &Arc<Self>, source: SourceKey) -> Result<GatePermit, GateRefusal> {
        let mut s = self.lock();
        if s.total >= self.max_total {
            return Err(GateRefusal::Total(self.max_total));
        }
        if s.per_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            return Err(GateRefusal::Source(self.max_per_source));
        }
        *s.per_source.entry(source).or_insert(0) += 1;
        s.total += 1;
        Ok(GatePermit {
            gate: self.clone(),
            source,
        })
    }

    /// Holders at the moment.
    pub fn in_use(&self) -> usize {
        self.lock().total
    }
}

/// One entry into a [`Gate`]; leaving is dropping it.
#[derive(Debug)]
pub struct GatePermit {
    gate: Arc<Gate>,
    source: SourceKey,
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.total = s.total.saturating_sub(1);
        if let Some(held) = s.per_source.get_mut(&self.source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                s.per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_by_ipv4_address_or_ipv6_network() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap_or(IpAddr::V4([0; 4].into()));
        assert_eq!(SourceKey::of(v4).to_string(), "10.1.2.3");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap_or(v4);
        assert_eq!(SourceKey::of(mapped), SourceKey::of(v4));
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or(v4);
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap_or(v4);
        assert_eq!(SourceKey::of(a), SourceKey::of(b));
        assert_eq!(SourceKey::of(a).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn a_gate_caps_each_source_and_the_total_and_frees_on_drop() {
        let gate = Gate::new(3, 2);
        let one = SourceKey::of(IpAddr::V4([10, 0, 0, 1].into()));
        let two = SourceKey::of(IpAddr::V4([10, 0, 0, 2].into()));
        let a = gate.try_enter(one).expect("first");
        let _b = gate.try_enter(one).expect("second");
        assert_eq!(gate.try_enter(one).err(), Some(GateRefusal::Source(2)));
        let _c = gate.try_enter(two).expect("another source");
        assert_eq!(gate.try_enter(two).err(), Some(GateRefusal::Total(3)));
        drop(a);
        assert_eq!(gate.in_use(), 2);
        assert!(gate.try_enter(one).is_ok());
        assert_eq!(gate.in_use(), 2, "the permit above was dropped at once");
    }
}
