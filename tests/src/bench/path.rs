//! The paths a request takes in the benchmark, and the rows of its report.

/// A path a request takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharePath {
    /// `Provider.Fetch` straight to the example provider over mTLS, as its node calls it: the floor.
    Direct,
    /// The same fetch through one nginx `grpc_pass` mTLS proxy.
    Nginx1,
    /// The same fetch through a chain of four nginx proxies.
    Nginx4,
    /// A share by an agency of county node 350102 of its own node's provider.
    SameNode,
    /// A same-node share of a conditional resource under a grant.
    Conditional,
    /// A share by an agency of 350203 of 350102's provider: 350203 → 350200 → 350000 → 350100 → 350102,
    /// a new key every time, so the consumer node's cache never answers.
    CrossCity,
    /// The cross-city share of keys 350203 already holds in its cache.
    CacheHit,
}

impl SharePath {
    /// Every path, in report order.
    pub const ALL: [SharePath; 7] = [
        Self::Direct,
        Self::Nginx1,
        Self::Nginx4,
        Self::SameNode,
        Self::Conditional,
        Self::CrossCity,
        Self::CacheHit,
    ];

    /// Short name, used in the table and in `SHARE_BENCH_ONLY`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Nginx1 => "nginx1",
            Self::Nginx4 => "nginx4",
            Self::SameNode => "same-node",
            Self::Conditional => "conditional",
            Self::CrossCity => "cross-city",
            Self::CacheHit => "cache-hit",
        }
    }

    /// The path with this [`SharePath::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// One line on what the path is.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Direct => "Provider.Fetch straight to the provider over mTLS (the floor)",
            Self::Nginx1 => "the same fetch through one nginx grpc_pass mTLS proxy",
            Self::Nginx4 => "the same fetch through four nginx proxies in a chain",
            Self::SameNode => "same-node share: county agency -> 350102 -> provider",
            Self::Conditional => "same-node share of a conditional resource under a grant",
            Self::CrossCity => {
                "cross-city share 350203 -> 350200 -> 350000 -> 350100 -> 350102, uncached (a new key each time)"
            }
            Self::CacheHit => "the cross-city share answered from 350203's cache",
        }
    }

    /// Whether the path runs through nginx.
    pub(super) fn needs_nginx(self) -> bool {
        matches!(self, Self::Nginx1 | Self::Nginx4)
    }
}

/// The rows of the report: each path at each concurrency measured.
pub const ROWS: [(SharePath, usize); 15] = [
    (SharePath::Direct, 1),
    (SharePath::Direct, 64),
    (SharePath::Nginx1, 1),
    (SharePath::Nginx1, 64),
    (SharePath::Nginx4, 1),
    (SharePath::Nginx4, 64),
    (SharePath::SameNode, 1),
    (SharePath::SameNode, 64),
    (SharePath::SameNode, 256),
    (SharePath::Conditional, 1),
    (SharePath::Conditional, 64),
    (SharePath::CrossCity, 1),
    (SharePath::CrossCity, 64),
    (SharePath::CacheHit, 1),
    (SharePath::CacheHit, 64),
];
