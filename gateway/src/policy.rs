//! Share policy at the provider's node: what may be served, which fields, and how values are masked.

use fedgate_proto::v1::{CatalogEntry, MaskRule, Record, ShareMode, ShareRequest, ShareType};

use crate::error::{Error, Result};
use crate::ident::IdNumber;

/// Proof that a request may be served: the entry it is served under and exactly the fields to return.
#[derive(Debug, Clone)]
pub struct Permit {
    /// The catalog entry at the version served.
    pub entry: CatalogEntry,
    /// Fields the answer may contain, in catalog order.
    pub fields: Vec<String>,
    /// The resource's key field.
    pub key_field: String,
}

/// Decides whether `req` may be served from `entry`, which this node holds.
pub fn authorize(entry: &CatalogEntry, req: &ShareRequest) -> Result<Permit> {
    let id = &entry.id;
    match ShareType::try_from(entry.share_type).unwrap_or(ShareType::Unspecified) {
        ShareType::Unconditional => {}
        ShareType::Conditional => {
            return Err(Error::FailedPrecondition(format!(
                "resource {id} is conditional: approval required before it is shared"
            )));
        }
        ShareType::NotShared | ShareType::Unspecified => {
            return Err(Error::PermissionDenied(format!(
                "resource {id} is not shared"
            )));
        }
    }
    let mode = match ShareMode::try_from(req.mode) {
        Ok(ShareMode::Unspecified) => ShareMode::Query,
        Ok(m) => m,
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "mode {} is not a known share mode",
                req.mode
            )));
        }
    };
    if !entry.share_modes.contains(&(mode as i32)) {
        return Err(Error::FailedPrecondition(format!(
            "resource {id} does not allow mode {}",
            mode.as_str_name()
        )));
    }
    if mode != ShareMode::Query {
        return Err(Error::FailedPrecondition(format!(
            "mode {} of resource {id} needs a grant; only QUERY on unconditional resources is served without one",
            mode.as_str_name()
        )));
    }
    let key_field = if entry.key_field.is_empty() {
        entry
            .fields
            .first()
            .map(|f| f.name.clone())
            .unwrap_or_default()
    } else {
        entry.key_field.clone()
    };
    validate_key(entry, &key_field, &req.key)?;
    let fields = if req.fields.is_empty() {
        entry.fields.iter().map(|f| f.name.clone()).collect()
    } else {
        for f in &req.fields {
            if !entry.fields.iter().any(|e| &e.name == f) {
                return Err(Error::InvalidArgument(format!(
                    "fields: {f:?} is not a field of resource {id}"
                )));
            }
        }
        entry
            .fields
            .iter()
            .filter(|e| req.fields.contains(&e.name))
            .map(|e| e.name.clone())
            .collect()
    };
    Ok(Permit {
        entry: entry.clone(),
        fields,
        key_field,
    })
}

fn validate_key(entry: &CatalogEntry, key_field: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "key is required: the value of {key_field} to look up in {}",
            entry.id
        )));
    }
    let rule = entry
        .fields
        .iter()
        .find(|f| f.name == key_field)
        .map(|f| MaskRule::try_from(f.mask).unwrap_or(MaskRule::Unspecified));
    if rule == Some(MaskRule::IdNumber) {
        key.parse::<IdNumber>()
            .map_err(|e| Error::InvalidArgument(format!("key: {e}")))?;
    }
    Ok(())
}

/// Limits records to the permitted fields and masks each value by its field's rule.
pub fn shape(permit: &Permit, records: Vec<Record>) -> Vec<Record> {
    records
        .into_iter()
        .map(|mut r| {
            let values = permit
                .fields
                .iter()
                .filter_map(|name| {
                    let value = r.values.remove(name)?;
                    let rule = permit
                        .entry
                        .fields
                        .iter()
                        .find(|f| &f.name == name)
                        .map(|f| MaskRule::try_from(f.mask).unwrap_or(MaskRule::Unspecified))
                        .unwrap_or(MaskRule::Unspecified);
                    Some((name.clone(), mask(rule, &value)))
                })
                .collect();
            Record { values }
        })
        .collect()
}

/// Masks one value by a rule (seed 003 desensitization).
pub fn mask(rule: MaskRule, value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let n = chars.len();
    let keep = |head: usize, tail: usize| -> String {
        if n <= head + tail {
            return "*".repeat(n);
        }
        let mut s: String = chars[..head].iter().collect();
        s.extend(std::iter::repeat_n('*', n - head - tail));
        s.extend(&chars[n - tail..]);
        s
    };
    match rule {
        MaskRule::Unspecified | MaskRule::None => value.to_owned(),
        MaskRule::IdNumber => keep(6, 4),
        MaskRule::Phone => keep(3, 4),
        MaskRule::Name => match chars.first() {
            Some(first) if n > 1 => {
                let mut s = first.to_string();
                s.extend(std::iter::repeat_n('*', n - 1));
                s
            }
            _ => "*".repeat(n),
        },
        MaskRule::Address => {
            let mut s: String = chars.iter().take(6).collect();
            if n > 6 {
                s.push_str("****");
            }
            s
        }
        MaskRule::BankCard => keep(0, 4),
        MaskRule::FreeText => "****".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_the_usual_forms() {
        assert_eq!(
            mask(MaskRule::IdNumber, "350102199003071234"),
            "350102********1234"
        );
        assert_eq!(mask(MaskRule::Phone, "13812345678"), "138****5678");
        assert_eq!(mask(MaskRule::Name, "张三"), "张*");
        assert_eq!(mask(MaskRule::Name, "欧阳明月"), "欧***");
        assert_eq!(
            mask(MaskRule::BankCard, "6222021234567890"),
            "************7890"
        );
        assert_eq!(
            mask(MaskRule::Address, "福建省福州市鼓楼区五四路1号"),
            "福建省福州市****"
        );
        assert_eq!(mask(MaskRule::FreeText, "anything"), "****");
        assert_eq!(mask(MaskRule::None, "clear"), "clear");
        assert_eq!(mask(MaskRule::Phone, "123"), "***");
    }
}
