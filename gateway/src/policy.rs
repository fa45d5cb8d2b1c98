//! Share policy at the provider's node: what may be served, which fields, and how values are masked.

use fedgate_proto::v1::{
    CatalogEntry, FieldCheck, Grant, MaskRule, Record, ShareMode, ShareRequest, ShareType,
    StatGroup, VerifyResult,
};

use crate::error::{Error, Result};
use crate::ident::IdNumber;

/// Proof that a request may be served: the entry, the mode, exactly the fields to use, and which may stay clear.
#[derive(Debug, Clone)]
pub struct Permit {
    /// The catalog entry at the version served.
    pub entry: CatalogEntry,
    /// The mode served.
    pub mode: ShareMode,
    /// Fields the answer may contain (query, bulk), compare (verify) or group by (statistics), in catalog order.
    pub fields: Vec<String>,
    /// The resource's key field.
    pub key_field: String,
    /// Fields whose clear value the grant allows.
    pub clear_fields: Vec<String>,
    /// Id of the grant served under, if any.
    pub grant_id: String,
}

/// Largest bulk page.
pub const MAX_BULK_PAGE: u32 = 5000;
/// Default bulk page.
pub const DEFAULT_BULK_PAGE: u32 = 1000;
/// Smallest statistics group when the provider declared none.
pub const DEFAULT_MIN_GROUP: u32 = 5;

/// The mode a request asks for; QUERY when unspecified.
pub fn requested_mode(req: &ShareRequest) -> Result<ShareMode> {
    match ShareMode::try_from(req.mode) {
        Ok(ShareMode::Unspecified) => Ok(ShareMode::Query),
        Ok(m) => Ok(m),
        Err(_) => Err(Error::InvalidArgument(format!(
            "mode {} is not a known share mode",
            req.mode
        ))),
    }
}

/// The fields a request uses in its mode, as a grant must cover them.
pub fn used_fields(req: &ShareRequest, mode: ShareMode) -> Vec<String> {
    match mode {
        ShareMode::Verify => {
            let mut f: Vec<String> = req.verify_values.keys().cloned().collect();
            f.sort();
            f
        }
        ShareMode::Statistics => req.group_by.clone(),
        _ => req.fields.clone(),
    }
}

fn check_fields(entry: &CatalogEntry, what: &str, fields: &[String]) -> Result<()> {
    for f in fields {
        if !entry.fields.iter().any(|e| &e.name == f) {
            return Err(Error::InvalidArgument(format!(
                "{what}: {f:?} is not a field of resource {}",
                entry.id
            )));
        }
    }
    Ok(())
}

fn in_catalog_order(entry: &CatalogEntry, fields: &[String]) -> Vec<String> {
    entry
        .fields
        .iter()
        .filter(|e| fields.contains(&e.name))
        .map(|e| e.name.clone())
        .collect()
}

/// Decides whether `req` may be served from `entry`, which this node holds, under `grant` (already checked
/// against the request by the governance module).
pub fn authorize(
    entry: &CatalogEntry,
    req: &ShareRequest,
    grant: Option<&Grant>,
) -> Result<Permit> {
    let id = &entry.id;
    let mode = requested_mode(req)?;
    match ShareType::try_from(entry.share_type).unwrap_or(ShareType::Unspecified) {
        ShareType::Unconditional => {
            if grant.is_none() && mode != ShareMode::Query {
                return Err(Error::FailedPrecondition(format!(
                    "mode {} of resource {id} needs a grant: apply for one first",
                    mode.as_str_name()
                )));
            }
        }
        ShareType::Conditional => {
            if grant.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "resource {id} is conditional: approval required before it is shared"
                )));
            }
        }
        ShareType::NotShared | ShareType::Unspecified => {
            return Err(Error::PermissionDenied(format!(
                "resource {id} is not shared"
            )));
        }
    }
    if !entry.share_modes.contains(&(mode as i32)) {
        return Err(Error::FailedPrecondition(format!(
            "resource {id} does not allow mode {}",
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
    let fields = match mode {
        ShareMode::Verify => {
            let f = used_fields(req, mode);
            if f.is_empty() {
                return Err(Error::InvalidArgument(
                    "verify_values: a verify share must supply at least one field value".into(),
                ));
            }
            check_fields(entry, "verify_values", &f)?;
            validate_key(entry, &key_field, &req.key)?;
            f
        }
        ShareMode::Statistics => {
            if let Some(f) = req
                .group_by
                .iter()
                .find(|f| !entry.statistics_dimensions.contains(f))
            {
                return Err(Error::InvalidArgument(format!(
                    "group_by: {f:?} is not a statistics dimension of resource {id} (allowed: {})",
                    entry.statistics_dimensions.join(", ")
                )));
            }
            req.group_by.clone()
        }
        ShareMode::Bulk | ShareMode::Query | ShareMode::Unspecified => {
            if mode != ShareMode::Bulk {
                validate_key(entry, &key_field, &req.key)?;
            } else if req.page_size > MAX_BULK_PAGE {
                return Err(Error::InvalidArgument(format!(
                    "page_size {} exceeds the maximum of {MAX_BULK_PAGE}",
                    req.page_size
                )));
            }
            check_fields(entry, "fields", &req.fields)?;
            let wanted = match (req.fields.is_empty(), grant) {
                (false, _) => req.fields.clone(),
                (true, Some(g)) => g.fields.clone(),
                (true, None) => entry.fields.iter().map(|f| f.name.clone()).collect(),
            };
            in_catalog_order(entry, &wanted)
        }
    };
    Ok(Permit {
        entry: entry.clone(),
        mode,
        fields,
        key_field,
        clear_fields: grant.map(|g| g.clear_fields.clone()).unwrap_or_default(),
        grant_id: grant.map(|g| g.id.clone()).unwrap_or_default(),
    })
}

/// Decides whether a public open-data download of `entry` may be served: only unconditionally shared, open
/// resources, in bulk, always masked.
pub fn authorize_open(entry: &CatalogEntry, req: &ShareRequest) -> Result<Permit> {
    let id = &entry.id;
    if !entry.open {
        return Err(Error::NotFound(format!("resource {id} is not open data")));
    }
    if ShareType::try_from(entry.share_type).unwrap_or(ShareType::Unspecified)
        != ShareType::Unconditional
    {
        return Err(Error::FailedPrecondition(format!(
            "resource {id} is opened on application only: an agency applies for it through Agency.Apply"
        )));
    }
    if req.page_size > MAX_BULK_PAGE {
        return Err(Error::InvalidArgument(format!(
            "page_size {} exceeds the maximum of {MAX_BULK_PAGE}",
            req.page_size
        )));
    }
    check_fields(entry, "fields", &req.fields)?;
    let wanted = if req.fields.is_empty() {
        entry.fields.iter().map(|f| f.name.clone()).collect()
    } else {
        req.fields.clone()
    };
    Ok(Permit {
        entry: entry.clone(),
        mode: ShareMode::Bulk,
        fields: in_catalog_order(entry, &wanted),
        key_field: entry.key_field.clone(),
        clear_fields: Vec::new(),
        grant_id: String::new(),
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

/// Compares supplied values with a stored record, field by field; stored values never leave.
pub fn verify(
    supplied: &std::collections::HashMap<String, String>,
    stored: Option<&Record>,
) -> Vec<FieldCheck> {
    let mut names: Vec<&String> = supplied.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|field| {
            let result = match stored {
                None => VerifyResult::NoRecord,
                Some(r)
                    if r.values.get(field).map(|v| v.trim())
                        == supplied.get(field).map(|v| v.trim()) =>
                {
                    VerifyResult::Match
                }
                Some(_) => VerifyResult::Mismatch,
            };
            FieldCheck {
                field: field.clone(),
                result: result as i32,
            }
        })
        .collect()
}

/// Refuses a statistics answer in which any group is smaller than the provider's minimum.
pub fn check_groups(entry: &CatalogEntry, groups: &[StatGroup]) -> Result<()> {
    let min = if entry.min_group_size == 0 {
        DEFAULT_MIN_GROUP
    } else {
        entry.min_group_size
    };
    if let Some(g) = groups.iter().find(|g| g.count < u64::from(min)) {
        let dims: Vec<String> = g
            .dimensions
            .iter()
            .map(|d| format!("{}={}", d.field, d.value))
            .collect();
        return Err(Error::FailedPrecondition(format!(
            "statistics of {} refused: group [{}] has {} records, below the minimum of {min} that protects individuals",
            entry.id,
            dims.join(", "),
            g.count
        )));
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
                    let value = if permit.clear_fields.contains(name) {
                        value
                    } else {
                        mask(rule, &value)
                    };
                    Some((name.clone(), value))
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
