//! Identifiers used across fedgate: administrative division codes (GB/T 2260) that name nodes,
//! unified social credit codes (GB 32100-2015) that name agencies, resident ID numbers (GB 11643)
//! that key people in the data, and the `urn:fedgate:` peer URIs carried in certificates.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// At most the first [`crate::limits::EXCERPT_CHARS`] characters of a rejected input: what an error quotes.
fn shown(value: &str) -> String {
    crate::limits::excerpt(value)
}

/// Why an identifier was rejected; every variant names the offending value (a short excerpt of it).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentError {
    /// A division code did not have exactly six characters.
    #[error("division code {value:?} must be 6 digits, but it has {len} characters")]
    DivisionLength {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// Its length in characters.
        len: usize,
    },
    /// A division code contained something other than an ASCII digit.
    #[error("division code {value:?} must be 6 digits, but it contains {ch:?}")]
    DivisionNonDigit {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The first offending character.
        ch: char,
    },
    /// The first two digits are not a province-level prefix.
    #[error(
        "division code {value:?} starts with {prefix:?}, which is not a province-level prefix \
         (11-15, 21-23, 31-37, 41-46, 50-54, 61-65, 71, 81, 82)"
    )]
    DivisionProvince {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The two-digit prefix.
        prefix: String,
    },
    /// A county part without a city part (`PP00DD`).
    #[error(
        "division code {value:?} has county digits {county:?} but city digits \"00\"; \
         expected PP0000 (province), PPCC00 (city) or PPCCDD (county)"
    )]
    DivisionStructure {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The last two digits.
        county: String,
    },
    /// A unified social credit code had the wrong length.
    #[error("unified social credit code {value:?} must be {expected} characters, but it has {len}")]
    UsccLength {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// Its length in characters.
        len: usize,
        /// The required length (18, or 17 for [`Uscc::with_check`]).
        expected: usize,
    },
    /// A unified social credit code contained a lowercase letter.
    #[error(
        "unified social credit code {value:?} contains lowercase {ch:?} at position {pos}; \
         codes use uppercase letters only"
    )]
    UsccLowercase {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The offending character.
        ch: char,
        /// Its 1-based position.
        pos: usize,
    },
    /// A unified social credit code contained a character outside `0-9A-HJ-NPQRTUWXY`.
    #[error(
        "unified social credit code {value:?} contains {ch:?} at position {pos}, \
         which is not in 0-9A-HJ-NPQRTUWXY (I, O, Z, S and V are never used)"
    )]
    UsccChar {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The offending character.
        ch: char,
        /// Its 1-based position.
        pos: usize,
    },
    /// A unified social credit code's check character did not match.
    #[error(
        "unified social credit code {value:?} has check character {found:?} but {expected:?} was expected"
    )]
    UsccCheck {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The check character present.
        found: char,
        /// The check character computed from the first 17.
        expected: char,
    },
    /// An ID number had the wrong length.
    #[error("ID number {value:?} must be {expected} characters, but it has {len}")]
    IdLength {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// Its length in characters.
        len: usize,
        /// The required length (18, or 17 for [`IdNumber::with_check`]).
        expected: usize,
    },
    /// An ID number had a non-digit among its first 17 characters, or a bad last character.
    #[error(
        "ID number {value:?} contains {ch:?} at position {pos}; positions 1-17 must be digits \
         and position 18 a digit or X"
    )]
    IdChar {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The offending character.
        ch: char,
        /// Its 1-based position.
        pos: usize,
    },
    /// An ID number's check digit did not match.
    #[error("ID number {value:?} has check character {found:?} but {expected:?} was expected")]
    IdCheck {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The check character present.
        found: char,
        /// The check character computed from the first 17 digits.
        expected: char,
    },
    /// An ID number's birth date (characters 7-14) is not a real date in 1900..=2100.
    #[error("ID number {value:?} has birth date {date:?}, which is not a real date: {reason}")]
    IdBirthDate {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// The eight date digits.
        date: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A peer URI did not use a known `urn:fedgate:` form.
    #[error(
        "peer URI {value:?} must be urn:fedgate:node:<division code> or urn:fedgate:agency:<USCC>"
    )]
    PeerUriScheme {
        /// The rejected input (at most its first 32 characters).
        value: String,
    },
    /// A peer URI had the right form but an invalid identifier.
    #[error("peer URI {value:?} has an invalid identifier: {source}")]
    PeerUriIdent {
        /// The rejected input (at most its first 32 characters).
        value: String,
        /// Why the identifier was rejected.
        source: Box<IdentError>,
    },
}

// ---------------------------------------------------------------------------------------------
// Division codes
// ---------------------------------------------------------------------------------------------

/// Level of an administrative division and of the exchange node that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// `PP0000`: a province, autonomous region or municipality (runs the hub).
    Province,
    /// `PPCC00`: a prefecture-level city.
    City,
    /// `PPCCDD`: a county or district.
    County,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Province => "province",
            Level::City => "city",
            Level::County => "county",
        })
    }
}

/// A 6-digit GB/T 2260 administrative division code naming a node (`350000`, `350100`, `350102`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DivisionCode([u8; 6]);

/// Whether `pp` (two ASCII digits as a number) is a province-level prefix.
fn is_province_prefix(pp: u8) -> bool {
    matches!(pp, 11..=15 | 21..=23 | 31..=37 | 41..=46 | 50..=54 | 61..=65 | 71 | 81 | 82)
}

impl DivisionCode {
    /// Parses and validates a division code.
    pub fn parse(s: &str) -> Result<Self, IdentError> {
        let len = s.chars().count();
        if let Some(ch) = s.chars().find(|c| !c.is_ascii_digit()) {
            return Err(IdentError::DivisionNonDigit {
                value: shown(s),
                ch,
            });
        }
        let bytes: [u8; 6] = s
            .as_bytes()
            .try_into()
            .map_err(|_| IdentError::DivisionLength {
                value: shown(s),
                len,
            })?;
        let pp = (bytes[0] - b'0') * 10 + (bytes[1] - b'0');
        if !is_province_prefix(pp) {
            return Err(IdentError::DivisionProvince {
                value: shown(s),
                prefix: s[..2].to_owned(),
            });
        }
        if &bytes[2..4] == b"00" && &bytes[4..6] != b"00" {
            return Err(IdentError::DivisionStructure {
                value: shown(s),
                county: s[4..].to_owned(),
            });
        }
        Ok(DivisionCode(bytes))
    }

    /// The code as its six digits.
    pub fn as_str(&self) -> &str {
        // Constructed only from six ASCII digits, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Whether this code names a province, a city or a county.
    pub fn level(&self) -> Level {
        if &self.0[2..6] == b"0000" {
            Level::Province
        } else if &self.0[4..6] == b"00" {
            Level::City
        } else {
            Level::County
        }
    }

    /// The enclosing division: county → `PPCC00`, city → `PP0000`, province → `None`.
    pub fn parent(&self) -> Option<DivisionCode> {
        let mut b = self.0;
        match self.level() {
            Level::Province => return None,
            Level::City => b[2..6].copy_from_slice(b"0000"),
            Level::County => b[4..6].copy_from_slice(b"00"),
        }
        Some(DivisionCode(b))
    }

    /// Whether `other` is this division or lies anywhere beneath it.
    pub fn contains(&self, other: &DivisionCode) -> bool {
        match self.level() {
            Level::Province => self.0[..2] == other.0[..2],
            Level::City => self.0[..4] == other.0[..4],
            Level::County => self == other,
        }
    }

    /// Whether this division is the direct parent of `other`.
    pub fn is_parent_of(&self, other: &DivisionCode) -> bool {
        other.parent().as_ref() == Some(self)
    }

    /// The direct child of this division whose subtree contains `target`, or `None` if `target`
    /// is not strictly beneath this division.
    pub fn child_toward(&self, target: &DivisionCode) -> Option<DivisionCode> {
        if self == target || !self.contains(target) {
            return None;
        }
        let mut cur = *target;
        loop {
            let parent = cur.parent()?;
            if parent == *self {
                return Some(cur);
            }
            cur = parent;
        }
    }
}

impl fmt::Display for DivisionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DivisionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DivisionCode({})", self.as_str())
    }
}

impl FromStr for DivisionCode {
    type Err = IdentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for DivisionCode {
    type Error = IdentError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl TryFrom<&str> for DivisionCode {
    type Error = IdentError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<DivisionCode> for String {
    fn from(c: DivisionCode) -> String {
        c.as_str().to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Unified social credit codes
// ---------------------------------------------------------------------------------------------

/// The 31 characters a USCC may contain, in check-value order.
const USCC_ALPHABET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
/// Weights of the first 17 USCC characters.
const USCC_WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// A GB 32100-2015 unified social credit code naming an agency or organisation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Uscc(String);

/// Validates USCC characters and returns their alphabet values; `expected` is the required length.
fn uscc_values(value: &str, expected: usize) -> Result<Vec<u32>, IdentError> {
    let len = value.chars().count();
    if len != expected {
        return Err(IdentError::UsccLength {
            value: shown(value),
            len,
            expected,
        });
    }
    value
        .chars()
        .enumerate()
        .map(|(i, ch)| {
            if ch.is_ascii_lowercase() {
                return Err(IdentError::UsccLowercase {
                    value: shown(value),
                    ch,
                    pos: i + 1,
                });
            }
            u8::try_from(ch)
                .ok()
                .and_then(|b| USCC_ALPHABET.iter().position(|&a| a == b))
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| IdentError::UsccChar {
                    value: shown(value),
                    ch,
                    pos: i + 1,
                })
        })
        .collect()
}

/// The check character for the alphabet values of the first 17 USCC characters.
fn uscc_check(values: &[u32]) -> char {
    let sum: u32 = values.iter().zip(USCC_WEIGHTS).map(|(v, w)| v * w).sum();
    let idx = (31 - sum % 31) % 31;
    char::from(USCC_ALPHABET[idx as usize])
}

impl Uscc {
    /// Parses and validates an 18-character code, including its check character.
    pub fn parse(s: &str) -> Result<Self, IdentError> {
        let values = uscc_values(s, 18)?;
        let expected = uscc_check(&values[..17]);
        let found = s.chars().last().unwrap_or_default();
        if found != expected {
            return Err(IdentError::UsccCheck {
                value: shown(s),
                found,
                expected,
            });
        }
        Ok(Uscc(s.to_owned()))
    }

    /// Builds a valid code from its first 17 characters by appending the computed check character.
    pub fn with_check(first17: &str) -> Result<Uscc, IdentError> {
        let values = uscc_values(first17, 17)?;
        let mut s = first17.to_owned();
        s.push(uscc_check(&values));
        Ok(Uscc(s))
    }

    /// The code as its 18 characters.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Characters 3–8: the division code of the registering authority (not validated).
    pub fn registering_division(&self) -> &str {
        self.0.get(2..8).unwrap_or_default()
    }

    /// The registering authority's division as a [`DivisionCode`], if it is a valid one.
    pub fn registering_division_code(&self) -> Option<DivisionCode> {
        DivisionCode::parse(self.registering_division()).ok()
    }
}

impl fmt::Display for Uscc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Uscc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uscc({})", self.0)
    }
}

impl FromStr for Uscc {
    type Err = IdentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Uscc {
    type Error = IdentError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl TryFrom<&str> for Uscc {
    type Error = IdentError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<Uscc> for String {
    fn from(c: Uscc) -> String {
        c.0
    }
}

// ---------------------------------------------------------------------------------------------
// Resident ID numbers
// ---------------------------------------------------------------------------------------------

/// ISO 7064 MOD 11-2 weights of the first 17 ID digits.
const ID_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
/// Check character indexed by the weighted sum modulo 11.
const ID_CHECK: &[u8; 11] = b"10X98765432";

/// An 18-character GB 11643 resident ID number; `Debug` masks it, `Display` prints it in full.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdNumber(String);

/// Validates the 17 leading digits (and birth date) of an ID number and returns its check char.
fn id_check_for(value: &str, digits: &str) -> Result<char, IdentError> {
    let mut sum = 0u32;
    for (i, ch) in digits.chars().enumerate() {
        let d = ch.to_digit(10).ok_or_else(|| IdentError::IdChar {
            value: shown(value),
            ch,
            pos: i + 1,
        })?;
        sum += d * ID_WEIGHTS[i];
    }
    check_birth_date(value, &digits[6..14])?;
    Ok(char::from(ID_CHECK[(sum % 11) as usize]))
}

/// Checks that `date` (eight ASCII digits, YYYYMMDD) is a real date with year 1900..=2100.
fn check_birth_date(value: &str, date: &str) -> Result<(), IdentError> {
    let bad = |reason| IdentError::IdBirthDate {
        value: shown(value),
        date: date.to_owned(),
        reason,
    };
    let num = |r: std::ops::Range<usize>| date.get(r).and_then(|s| s.parse::<u32>().ok());
    let (Some(year), Some(month), Some(day)) = (num(0..4), num(4..6), num(6..8)) else {
        return Err(bad("it is not eight digits"));
    };
    if !(1900..=2100).contains(&year) {
        return Err(bad("the year must be between 1900 and 2100"));
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad("the month must be 01 to 12")),
    };
    if day == 0 || day > days {
        return Err(bad("the day does not exist in that month"));
    }
    Ok(())
}

impl IdNumber {
    /// Parses and validates an ID number; a lowercase `x` check character is normalised to `X`.
    pub fn parse(s: &str) -> Result<Self, IdentError> {
        let len = s.chars().count();
        if len != 18 {
            return Err(IdentError::IdLength {
                value: shown(s),
                len,
                expected: 18,
            });
        }
        if let Some((i, ch)) = s.char_indices().find(|&(_, c)| !c.is_ascii()) {
            return Err(IdentError::IdChar {
                value: shown(s),
                ch,
                pos: s[..i].chars().count() + 1,
            });
        }
        let (digits, last) = s.split_at(17);
        let expected = id_check_for(s, digits)?;
        let found = last.chars().next().unwrap_or_default();
        let found = if found == 'x' { 'X' } else { found };
        if !(found.is_ascii_digit() || found == 'X') {
            return Err(IdentError::IdChar {
                value: shown(s),
                ch: found,
                pos: 18,
            });
        }
        if found != expected {
            return Err(IdentError::IdCheck {
                value: shown(s),
                found,
                expected,
            });
        }
        let mut norm = digits.to_owned();
        norm.push(found);
        Ok(IdNumber(norm))
    }

    /// Builds a valid ID number from its first 17 digits by appending the computed check character.
    pub fn with_check(first17: &str) -> Result<IdNumber, IdentError> {
        let len = first17.chars().count();
        if len != 17 || !first17.is_ascii() {
            if let Some((i, ch)) = first17.char_indices().find(|&(_, c)| !c.is_ascii()) {
                return Err(IdentError::IdChar {
                    value: shown(first17),
                    ch,
                    pos: first17[..i].chars().count() + 1,
                });
            }
            return Err(IdentError::IdLength {
                value: shown(first17),
                len,
                expected: 17,
            });
        }
        let check = id_check_for(first17, first17)?;
        let mut s = first17.to_owned();
        s.push(check);
        Ok(IdNumber(s))
    }

    /// The number as its 18 characters (check character upper-case).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The masked form used in shared and open data: first six and last four, e.g. `350102********1234`.
    pub fn masked(&self) -> String {
        let head = self.0.get(..6).unwrap_or_default();
        let tail = self.0.get(14..).unwrap_or_default();
        format!("{head}********{tail}")
    }
}

impl fmt::Display for IdNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdNumber({})", self.masked())
    }
}

impl FromStr for IdNumber {
    type Err = IdentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for IdNumber {
    type Error = IdentError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl TryFrom<&str> for IdNumber {
    type Error = IdentError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<IdNumber> for String {
    fn from(c: IdNumber) -> String {
        c.0
    }
}

// ---------------------------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------------------------

/// URI prefix of a node identity.
const NODE_URI_PREFIX: &str = "urn:fedgate:node:";
/// URI prefix of an agency identity.
const AGENCY_URI_PREFIX: &str = "urn:fedgate:agency:";

/// A party on the backbone, as named by the URI SAN of its certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Peer {
    /// An exchange node, named by its division code.
    Node(DivisionCode),
    /// An agency, named by its unified social credit code.
    Agency(Uscc),
}

impl Peer {
    /// The peer's URI: `urn:fedgate:node:350100` or `urn:fedgate:agency:<USCC>`.
    pub fn to_uri(&self) -> String {
        match self {
            Peer::Node(code) => format!("{NODE_URI_PREFIX}{code}"),
            Peer::Agency(uscc) => format!("{AGENCY_URI_PREFIX}{uscc}"),
        }
    }

    /// Parses a peer URI produced by [`Peer::to_uri`].
    pub fn from_uri(uri: &str) -> Result<Peer, IdentError> {
        let wrap = |e| IdentError::PeerUriIdent {
            value: shown(uri),
            source: Box::new(e),
        };
        if let Some(code) = uri.strip_prefix(NODE_URI_PREFIX) {
            DivisionCode::parse(code).map(Peer::Node).map_err(wrap)
        } else if let Some(code) = uri.strip_prefix(AGENCY_URI_PREFIX) {
            Uscc::parse(code).map(Peer::Agency).map_err(wrap)
        } else {
            Err(IdentError::PeerUriScheme { value: shown(uri) })
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

impl FromStr for Peer {
    type Err = IdentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_uri(s)
    }
}

impl TryFrom<String> for Peer {
    type Error = IdentError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::from_uri(&s)
    }
}

impl From<Peer> for String {
    fn from(p: Peer) -> String {
        p.to_uri()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dc(s: &str) -> DivisionCode {
        s.parse().unwrap()
    }

    #[test]
    fn division_levels_and_parents() {
        assert_eq!(dc("350000").level(), Level::Province);
        assert_eq!(dc("350100").level(), Level::City);
        assert_eq!(dc("350102").level(), Level::County);
        assert_eq!(dc("350102").parent(), Some(dc("350100")));
        assert_eq!(dc("350100").parent(), Some(dc("350000")));
        assert_eq!(dc("350000").parent(), None);
        assert_eq!(dc("350102").to_string(), "350102");
        assert_eq!(dc("350102").as_str(), "350102");
        assert_eq!(format!("{:?}", dc("350102")), "DivisionCode(350102)");
        for ok in [
            "110000", "110101", "150000", "710000", "810000", "820000", "659001",
        ] {
            assert!(ok.parse::<DivisionCode>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn division_rejects_bad_codes() {
        let e = "35010".parse::<DivisionCode>().unwrap_err();
        assert!(matches!(e, IdentError::DivisionLength { len: 5, .. }));
        assert!(e.to_string().contains("\"35010\" must be 6 digits"), "{e}");
        assert!(matches!(
            "3501000".parse::<DivisionCode>(),
            Err(IdentError::DivisionLength { len: 7, .. })
        ));
        assert!(matches!(
            "".parse::<DivisionCode>(),
            Err(IdentError::DivisionLength { len: 0, .. })
        ));
        let e = "990000".parse::<DivisionCode>().unwrap_err();
        assert!(matches!(e, IdentError::DivisionProvince { .. }));
        assert!(e.to_string().contains("\"99\""), "{e}");
        for bad in ["000000", "160000", "240000", "700000", "830000"] {
            assert!(
                matches!(
                    bad.parse::<DivisionCode>(),
                    Err(IdentError::DivisionProvince { .. })
                ),
                "{bad}"
            );
        }
        let e = "350001".parse::<DivisionCode>().unwrap_err();
        assert!(matches!(e, IdentError::DivisionStructure { .. }));
        assert!(e.to_string().contains("\"350001\""), "{e}");
        let e = "3501a0".parse::<DivisionCode>().unwrap_err();
        assert!(matches!(e, IdentError::DivisionNonDigit { ch: 'a', .. }));
        assert!(matches!(
            "３５０１００".parse::<DivisionCode>(),
            Err(IdentError::DivisionNonDigit { .. })
        ));
        assert!(matches!(
            " 350100".parse::<DivisionCode>(),
            Err(IdentError::DivisionNonDigit { ch: ' ', .. })
        ));
    }

    #[test]
    fn division_tree_relations() {
        let (p, c, d) = (dc("350000"), dc("350100"), dc("350102"));
        let other_city = dc("350200");
        let other_prov = dc("440000");
        assert!(p.contains(&p) && p.contains(&c) && p.contains(&d));
        assert!(c.contains(&d) && !c.contains(&p) && !c.contains(&other_city));
        assert!(d.contains(&d) && !d.contains(&c));
        assert!(!p.contains(&other_prov));
        assert!(p.is_parent_of(&c) && c.is_parent_of(&d));
        assert!(!p.is_parent_of(&d) && !p.is_parent_of(&p) && !d.is_parent_of(&c));
        assert_eq!(p.child_toward(&d), Some(c));
        assert_eq!(p.child_toward(&c), Some(c));
        assert_eq!(c.child_toward(&d), Some(d));
        assert_eq!(p.child_toward(&p), None);
        assert_eq!(c.child_toward(&p), None);
        assert_eq!(c.child_toward(&dc("350203")), None);
        assert_eq!(p.child_toward(&dc("440305")), None);
        assert_eq!(d.child_toward(&d), None);
    }

    #[test]
    fn division_serde_as_string() {
        let json = serde_json::to_string(&dc("350100")).unwrap();
        assert_eq!(json, "\"350100\"");
        let back: DivisionCode = serde_json::from_str(&json).unwrap();
        assert_eq!(back, dc("350100"));
        let err = serde_json::from_str::<DivisionCode>("\"350001\"").unwrap_err();
        assert!(err.to_string().contains("350001"), "{err}");
        assert_eq!(serde_json::to_string(&Level::City).unwrap(), "\"city\"");
    }

    #[test]
    fn uscc_valid_codes() {
        for ok in [
            "91110000600037341L",
            "91350100M000100Y43",
            "91350000158142711F",
            "12100000400000624D",
            "91440300708461136T",
        ] {
            let u: Uscc = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(u.to_string(), ok);
            assert_eq!(Uscc::with_check(&ok[..17]).unwrap(), u);
        }
        let u: Uscc = "91350100M000100Y43".parse().unwrap();
        assert_eq!(u.registering_division(), "350100");
        assert_eq!(u.registering_division_code(), Some(dc("350100")));
        let central: Uscc = "12100000400000624D".parse().unwrap();
        assert_eq!(central.registering_division(), "100000");
        assert_eq!(central.registering_division_code(), None);
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(json, "\"91350100M000100Y43\"");
        assert_eq!(serde_json::from_str::<Uscc>(&json).unwrap(), u);
    }

    #[test]
    fn uscc_rejects_bad_codes() {
        let e = "91110000600037341X".parse::<Uscc>().unwrap_err();
        assert_eq!(
            e,
            IdentError::UsccCheck {
                value: "91110000600037341X".into(),
                found: 'X',
                expected: 'L'
            }
        );
        assert!(
            e.to_string()
                .contains("has check character 'X' but 'L' was expected"),
            "{e}"
        );
        assert!(matches!(
            "91110000600037341".parse::<Uscc>(),
            Err(IdentError::UsccLength { len: 17, .. })
        ));
        assert!(matches!(
            "91110000600037341LL".parse::<Uscc>(),
            Err(IdentError::UsccLength { len: 19, .. })
        ));
        let e = "91110000600037341l".parse::<Uscc>().unwrap_err();
        assert!(matches!(
            e,
            IdentError::UsccLowercase {
                ch: 'l',
                pos: 18,
                ..
            }
        ));
        assert!(e.to_string().contains("uppercase"), "{e}");
        for forbidden in ['I', 'O', 'Z', 'S', 'V'] {
            let s = format!("91350100M00010{forbidden}Y4");
            let e = Uscc::with_check(&s).unwrap_err();
            assert!(
                matches!(e, IdentError::UsccChar { ch, pos: 15, .. } if ch == forbidden),
                "{e}"
            );
            let full = format!("{s}3");
            assert!(matches!(
                full.parse::<Uscc>(),
                Err(IdentError::UsccChar { .. })
            ));
        }
        assert!(matches!(
            "9135010０M000100Y43".parse::<Uscc>(),
            Err(IdentError::UsccChar { pos: 8, .. })
        ));
        assert!(matches!(
            Uscc::with_check("9135"),
            Err(IdentError::UsccLength { expected: 17, .. })
        ));
    }

    #[test]
    fn id_numbers() {
        let id: IdNumber = "11010519491231002X".parse().unwrap();
        assert_eq!(id.as_str(), "11010519491231002X");
        let lower: IdNumber = "11010519491231002x".parse().unwrap();
        assert_eq!(lower, id);
        assert_eq!(lower.to_string(), "11010519491231002X");
        assert_eq!(IdNumber::with_check("11010519491231002").unwrap(), id);
        assert_eq!(id.masked(), "110105********002X");
        assert_eq!(format!("{id:?}"), "IdNumber(110105********002X)");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<IdNumber>(&json).unwrap(), id);
        // leap day in a leap year
        let leap = IdNumber::with_check("35010220000229123").unwrap();
        assert_eq!(leap.as_str(), "350102200002291230");
        assert!(leap.as_str().parse::<IdNumber>().is_ok());
    }

    #[test]
    fn id_numbers_rejected() {
        let e = "110105194912310021".parse::<IdNumber>().unwrap_err();
        assert_eq!(
            e,
            IdentError::IdCheck {
                value: "110105194912310021".into(),
                found: '1',
                expected: 'X'
            }
        );
        let e = IdNumber::with_check("11010519490230002").unwrap_err();
        assert!(matches!(e, IdentError::IdBirthDate { ref date, .. } if date == "19490230"));
        assert!(e.to_string().contains("\"19490230\""), "{e}");
        for bad_date in [
            "11010518991231002",
            "11010521010101002",
            "11010519491301002",
        ] {
            assert!(matches!(
                IdNumber::with_check(bad_date),
                Err(IdentError::IdBirthDate { .. })
            ));
        }
        assert!(matches!(
            IdNumber::with_check("35010219000229123"),
            Err(IdentError::IdBirthDate { .. })
        ));
        assert!(matches!(
            "11010519491231002".parse::<IdNumber>(),
            Err(IdentError::IdLength { len: 17, .. })
        ));
        assert!(matches!(
            "1101051949123100AX".parse::<IdNumber>(),
            Err(IdentError::IdChar {
                ch: 'A',
                pos: 17,
                ..
            })
        ));
        assert!(matches!(
            "11010519491231002Y".parse::<IdNumber>(),
            Err(IdentError::IdChar {
                ch: 'Y',
                pos: 18,
                ..
            })
        ));
        assert!(matches!(
            "1101051949123100２X".parse::<IdNumber>(),
            Err(IdentError::IdChar { pos: 17, .. })
        ));
        assert!(matches!(
            IdNumber::with_check("1101051949123100２"),
            Err(IdentError::IdChar { pos: 17, .. })
        ));
    }

    #[test]
    fn peer_uris() {
        let node = Peer::Node(dc("350100"));
        assert_eq!(node.to_uri(), "urn:fedgate:node:350100");
        assert_eq!(node.to_string(), "urn:fedgate:node:350100");
        assert_eq!(Peer::from_uri("urn:fedgate:node:350100").unwrap(), node);
        let agency = Peer::Agency("91350100M000100Y43".parse().unwrap());
        assert_eq!(agency.to_uri(), "urn:fedgate:agency:91350100M000100Y43");
        assert_eq!(Peer::from_uri(&agency.to_uri()).unwrap(), agency);
        assert_eq!(
            serde_json::to_string(&agency).unwrap(),
            "\"urn:fedgate:agency:91350100M000100Y43\""
        );

        let e = Peer::from_uri("urn:fedgate:node:350001").unwrap_err();
        assert!(matches!(e, IdentError::PeerUriIdent { .. }));
        assert!(e.to_string().contains("urn:fedgate:node:350001"), "{e}");
        assert!(matches!(
            Peer::from_uri("urn:fedgate:agency:91110000600037341X"),
            Err(IdentError::PeerUriIdent { .. })
        ));
        for bad in [
            "",
            "urn:fedgate:350100",
            "https://350100.node.fedgate",
            "URN:FEDGATE:NODE:350100",
        ] {
            assert!(
                matches!(Peer::from_uri(bad), Err(IdentError::PeerUriScheme { .. })),
                "{bad}"
            );
        }
    }
}
