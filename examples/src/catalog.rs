//! Catalog entries (政务信息资源目录) of the civil-affairs registry's two resources.
//!
//! The entries carry only what the provider agency decides: their `id` is the bare local code (`household`,
//! `marriage`) and `node_code`, `version`, `updated_at` and `provider_uscc` are left empty for the node to fill
//! when the agency publishes them with `Agency.PublishEntry`.

use fedgate_proto::v1::{CatalogEntry, Field, MaskRule, Sensitivity, ShareMode, ShareType};

use crate::registry::{KEY_FIELD, Resource};

/// Smallest group a statistics answer on these resources may report.
pub const MIN_GROUP_SIZE: u32 = 5;

/// The fields a statistics share of `resource` may group by: coarse ones only, so that groups stay large.
///
/// Household: `gender`. Marriage: `marital_status` and `registration_office`.
pub fn statistics_dimensions(resource: Resource) -> &'static [&'static str] {
    match resource {
        Resource::Household => &["gender"],
        Resource::Marriage => &["marital_status", "registration_office"],
    }
}

/// The share modes the agency allows on `resource`.
///
/// Household: QUERY, VERIFY, STATISTICS and BULK. Marriage: QUERY, VERIFY and STATISTICS (no bulk export of
/// marital data).
pub fn share_modes(resource: Resource) -> Vec<ShareMode> {
    match resource {
        Resource::Household => vec![
            ShareMode::Query,
            ShareMode::Verify,
            ShareMode::Statistics,
            ShareMode::Bulk,
        ],
        Resource::Marriage => vec![ShareMode::Query, ShareMode::Verify, ShareMode::Statistics],
    }
}

/// The catalog entries of both registry resources, with the given share types (seed 002 art. 8-9).
///
/// Returns `[household, marriage]`; see [`entry`] for their content.
pub fn civil_affairs_entries(household: ShareType, marriage: ShareType) -> Vec<CatalogEntry> {
    vec![
        entry(Resource::Household, household),
        entry(Resource::Marriage, marriage),
    ]
}

/// The catalog entry of one registry resource with the given share type.
///
/// Its `id` is the resource's local code; it is a `table` keyed by `id_number`, updated `daily`, shared in the
/// modes of [`share_modes`], with the [`statistics_dimensions`] and a minimum group size of [`MIN_GROUP_SIZE`].
/// ID numbers, names, phones and addresses are SENSITIVE with the matching mask rule;
/// every other item is INTERNAL and unmasked.
pub fn entry(resource: Resource, share_type: ShareType) -> CatalogEntry {
    let (title, summary, subject) = match resource {
        Resource::Household => (
            "Household registration (户籍登记)",
            "Registered residents of the district (户籍人口信息): name, gender, birth date, address, \
             household number and phone, keyed by resident ID number.",
            "household",
        ),
        Resource::Marriage => (
            "Marriage registration (婚姻登记)",
            "Marital status of registered residents (婚姻状况): spouse, marriage date and the registering office, \
             keyed by resident ID number.",
            "marriage",
        ),
    };
    let usage_requirements = match share_type {
        ShareType::Conditional => {
            "Served under an approved grant only, for the stated business purpose (seed 002 art. 23, 25)."
        }
        ShareType::NotShared => "Listed for reference; not served.",
        _ => "Every use is logged (seed 002 art. 19); use only for the stated business purpose.",
    };
    CatalogEntry {
        id: resource.local_code().to_owned(),
        title: title.to_owned(),
        summary: summary.to_owned(),
        classification: vec!["civil-affairs".to_owned(), subject.to_owned()],
        format: "table".to_owned(),
        fields: resource.fields().iter().map(|name| field(name)).collect(),
        update_frequency: "daily".to_owned(),
        share_type: share_type as i32,
        share_modes: share_modes(resource)
            .into_iter()
            .map(|m| m as i32)
            .collect(),
        usage_requirements: usage_requirements.to_owned(),
        open: false,
        key_field: KEY_FIELD.to_owned(),
        statistics_dimensions: statistics_dimensions(resource)
            .iter()
            .map(|d| (*d).to_owned())
            .collect(),
        min_group_size: MIN_GROUP_SIZE,
        ..CatalogEntry::default()
    }
}

/// The catalog description of one registry field.
fn field(name: &str) -> Field {
    let (data_type, description, sensitivity, mask) = match name {
        "id_number" => (
            "string",
            "Resident ID number (公民身份号码), GB 11643",
            Sensitivity::Sensitive,
            MaskRule::IdNumber,
        ),
        "name" => (
            "string",
            "Name (姓名)",
            Sensitivity::Sensitive,
            MaskRule::Name,
        ),
        "phone" => (
            "string",
            "Mobile phone (联系电话)",
            Sensitivity::Sensitive,
            MaskRule::Phone,
        ),
        "address" => (
            "string",
            "Residential address (住址)",
            Sensitivity::Sensitive,
            MaskRule::Address,
        ),
        // The spouse's ID number is as personal as the resident's own.
        "spouse_id_number" => (
            "string",
            "Spouse's resident ID number (配偶身份号码)",
            Sensitivity::Sensitive,
            MaskRule::IdNumber,
        ),
        "gender" => (
            "string",
            "Gender (性别): male or female",
            Sensitivity::Internal,
            MaskRule::None,
        ),
        "birth_date" => (
            "date",
            "Date of birth (出生日期)",
            Sensitivity::Internal,
            MaskRule::None,
        ),
        "household_no" => (
            "string",
            "Household number (户号)",
            Sensitivity::Internal,
            MaskRule::None,
        ),
        "marital_status" => (
            "string",
            "Marital status (婚姻状况): unmarried, married, divorced or widowed",
            Sensitivity::Internal,
            MaskRule::None,
        ),
        "marriage_date" => (
            "date",
            "Date of marriage registration (登记日期)",
            Sensitivity::Internal,
            MaskRule::None,
        ),
        "registration_office" => (
            "string",
            "Marriage registration office (登记机关)",
            Sensitivity::Internal,
            MaskRule::None,
        ),
        _ => ("string", "", Sensitivity::Internal, MaskRule::None),
    };
    Field {
        name: name.to_owned(),
        data_type: data_type.to_owned(),
        description: description.to_owned(),
        sensitivity: sensitivity as i32,
        mask: mask as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_describe_both_resources() {
        let entries = civil_affairs_entries(ShareType::Unconditional, ShareType::Conditional);
        assert_eq!(entries.len(), 2);
        let (h, m) = (&entries[0], &entries[1]);
        assert_eq!(h.id, "household");
        assert_eq!(m.id, "marriage");
        assert_eq!(h.share_type, ShareType::Unconditional as i32);
        assert_eq!(m.share_type, ShareType::Conditional as i32);
        for (e, r) in [(h, Resource::Household), (m, Resource::Marriage)] {
            assert_eq!(e.key_field, "id_number");
            assert_eq!(e.format, "table");
            assert_eq!(e.update_frequency, "daily");
            assert_eq!(e.classification[0], "civil-affairs");
            assert_eq!(e.min_group_size, 5);
            assert!(
                e.statistics_dimensions
                    .iter()
                    .all(|d| r.fields().contains(&d.as_str()) && d != KEY_FIELD)
            );
            assert!(e.node_code.is_empty() && e.provider_uscc.is_empty() && e.version == 0);
            let names: Vec<_> = e.fields.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(names, r.fields());
            assert!(e.fields.iter().all(|f| !f.description.is_empty()));
        }
        let mask_of = |name: &str| {
            h.fields
                .iter()
                .find(|f| f.name == name)
                .map(|f| (f.sensitivity, f.mask))
        };
        assert_eq!(
            mask_of("id_number"),
            Some((Sensitivity::Sensitive as i32, MaskRule::IdNumber as i32))
        );
        assert_eq!(
            mask_of("name"),
            Some((Sensitivity::Sensitive as i32, MaskRule::Name as i32))
        );
        assert_eq!(
            mask_of("phone"),
            Some((Sensitivity::Sensitive as i32, MaskRule::Phone as i32))
        );
        assert_eq!(
            mask_of("address"),
            Some((Sensitivity::Sensitive as i32, MaskRule::Address as i32))
        );
        assert_eq!(
            mask_of("gender"),
            Some((Sensitivity::Internal as i32, MaskRule::None as i32))
        );
        let modes = |e: &CatalogEntry| -> Vec<_> {
            e.share_modes
                .iter()
                .filter_map(|m| ShareMode::try_from(*m).ok())
                .collect()
        };
        assert_eq!(
            modes(h),
            [
                ShareMode::Query,
                ShareMode::Verify,
                ShareMode::Statistics,
                ShareMode::Bulk
            ]
        );
        assert_eq!(
            modes(m),
            [ShareMode::Query, ShareMode::Verify, ShareMode::Statistics]
        );
        assert_eq!(h.statistics_dimensions, ["gender"]);
        assert_eq!(
            m.statistics_dimensions,
            ["marital_status", "registration_office"]
        );
        assert!(h.title.contains("户籍登记") && m.title.contains("婚姻登记"));
    }
}
