//! The working-day calendar that governance deadlines are counted on.
//!
//! Approvals, objections and catalog revisions are due "within N working days" (seed 002 art. 7, 22; see
//! `DOMAIN.md`). In China Monday to Friday are working days, except the public holidays the State Council
//! announces each year, and some Saturdays and Sundays are make-up working days (调休) that compensate for
//! them. Both lists are configuration ([`CalendarConfig`]); everything is counted on dates in the local time
//! of a configured UTC offset (+08:00 by default).
//!
//! A deadline is the *end* of its last working day, expressed as the exclusive instant 00:00 local time of
//! the following calendar day: an item is on time at any instant before it and overdue from it on
//! ([`WorkCalendar::is_overdue`]). That matches how grant expiries are read ("invalid from this instant").

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{Date, Duration, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset, Weekday};

/// `YYYY-MM-DD`, the only date format the configuration accepts.
const DATE_FORMAT: &[BorrowedFormatItem<'static>] = format_description!("[year]-[month]-[day]");

/// Smallest and largest approval deadline localities use, in working days (`DOMAIN.md`: 2 to 10).
const APPROVAL_DAYS_RANGE: (u32, u32) = (2, 10);

/// Bounds for the objection and catalog-revision deadlines, in working days.
const OTHER_DAYS_RANGE: (u32, u32) = (1, 30);

/// Bounds for the UTC offset, in whole hours (the offsets in use on Earth).
const OFFSET_RANGE: (i8, i8) = (-12, 14);

/// Longest holiday range (`"FROM..TO"`) one entry may span, in days.
const MAX_RANGE_DAYS: i64 = 366;

/// Working-day settings of a node: local offset, holidays, make-up working days and deadline lengths.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CalendarConfig {
    /// Local time zone as whole hours east of UTC (default 8, China Standard Time).
    pub utc_offset_hours: i8,
    /// Public holidays, `"YYYY-MM-DD"` each, or an inclusive range `"YYYY-MM-DD..YYYY-MM-DD"`.
    pub holidays: Vec<String>,
    /// Saturdays and Sundays that are working days (调休), `"YYYY-MM-DD"` each.
    pub makeup_workdays: Vec<String>,
    /// Working days a provider has to decide an application (default 5, allowed 2 to 10).
    pub approval_days: u32,
    /// Working days a provider has to answer an objection (default 5, allowed 1 to 30).
    pub objection_days: u32,
    /// Working days a catalog entry has to be revised after its provider changed (default 7, allowed 1 to 30).
    pub catalog_revision_days: u32,
    /// Working days the province's operator has to assign a filed demand (default 5, allowed 1 to 30).
    pub demand_assignment_days: u32,
    /// Working days an assigned provider has to answer a demand (default 10, allowed 1 to 30).
    pub demand_answer_days: u32,
}

impl Default for CalendarConfig {
    fn default() -> Self {
        Self {
            utc_offset_hours: 8,
            holidays: Vec::new(),
            makeup_workdays: Vec::new(),
            approval_days: 5,
            objection_days: 5,
            catalog_revision_days: 7,
            demand_assignment_days: 5,
            demand_answer_days: 10,
        }
    }
}

/// Why a [`CalendarConfig`] was rejected; every variant names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CalendarError {
    /// A date string was not a valid `YYYY-MM-DD` date (or range of them).
    #[error(
        "calendar {list}: {value:?} is not a valid date: {reason} (expected \"YYYY-MM-DD\"{range_hint})"
    )]
    BadDate {
        /// The list it was in (`holidays` or `makeup_workdays`).
        list: &'static str,
        /// The rejected string.
        value: String,
        /// What is wrong with it.
        reason: String,
        /// Mentions the range form where ranges are accepted.
        range_hint: &'static str,
    },
    /// A holiday range ran backwards or was too long.
    #[error("calendar holidays: range {value:?} {reason}")]
    BadRange {
        /// The rejected range string.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A date was listed both as a holiday and as a make-up working day.
    #[error("calendar: {date} is listed both as a holiday and as a make-up working day")]
    HolidayAndMakeup {
        /// The date, `YYYY-MM-DD`.
        date: String,
    },
    /// A make-up working day fell on a weekday, which is a working day anyway (most likely a typo).
    #[error(
        "calendar makeup_workdays: {value:?} is a {weekday}; make-up working days are Saturdays or Sundays"
    )]
    MakeupOnWeekday {
        /// The date string as configured.
        value: String,
        /// Its day of the week.
        weekday: Weekday,
    },
    /// A numeric setting was outside its allowed range.
    #[error("calendar {setting} = {value} is out of range; allowed {min} to {max}")]
    OutOfRange {
        /// The setting's name.
        setting: &'static str,
        /// The configured value.
        value: i64,
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
    },
}

impl CalendarError {
    /// The key of the setting at fault in `config` (the `[calendar]` it was read from), with the index of the
    /// list entry: `calendar.holidays[2]`, `calendar.makeup_workdays[0]`, `calendar.approval_days`.
    pub fn key(&self, config: &CalendarConfig) -> String {
        let at = |list: &str, values: &[String], value: &str| match values
            .iter()
            .position(|v| v == value)
        {
            Some(i) => format!("calendar.{list}[{i}]"),
            None => format!("calendar.{list}"),
        };
        match self {
            Self::BadDate { list, value, .. } => {
                let values = if *list == "holidays" {
                    &config.holidays
                } else {
                    &config.makeup_workdays
                };
                // A range's half is reported alone; its entry is the one containing it.
                match values
                    .iter()
                    .position(|v| v == value || v.split("..").any(|h| h == value))
                {
                    Some(i) => format!("calendar.{list}[{i}]"),
                    None => format!("calendar.{list}"),
                }
            }
            Self::BadRange { value, .. } => at("holidays", &config.holidays, value),
            Self::HolidayAndMakeup { date } => at("makeup_workdays", &config.makeup_workdays, date),
            Self::MakeupOnWeekday { value, .. } => {
                at("makeup_workdays", &config.makeup_workdays, value)
            }
            Self::OutOfRange { setting, .. } => format!("calendar.{setting}"),
        }
    }

    /// What is wrong, without the setting's name (which [`Self::key`] gives).
    pub fn detail(&self) -> String {
        match self {
            Self::BadDate {
                value,
                reason,
                range_hint,
                ..
            } => format!(
                "{value:?} is not a valid date: {reason} (expected \"YYYY-MM-DD\"{range_hint})"
            ),
            Self::BadRange { value, reason } => format!("range {value:?} {reason}"),
            Self::HolidayAndMakeup { date } => {
                format!("{date} is listed both as a holiday and as a make-up working day")
            }
            Self::MakeupOnWeekday { value, weekday } => {
                format!("{value:?} is a {weekday}; make-up working days are Saturdays or Sundays")
            }
            Self::OutOfRange {
                value, min, max, ..
            } => format!("{value} is out of range; allowed {min} to {max}"),
        }
    }
}

/// A validated working-day calendar: tells working days apart and counts deadlines.
#[derive(Clone, Debug)]
pub struct WorkCalendar {
    /// Local offset all dates are taken in.
    offset: UtcOffset,
    /// Days off that would otherwise be working days (may include weekends; harmless).
    holidays: BTreeSet<Date>,
    /// Weekend days that are working days.
    makeup: BTreeSet<Date>,
    /// Deadline of an application, in working days.
    approval_days: u32,
    /// Deadline of an objection, in working days.
    objection_days: u32,
    /// Deadline of a catalog revision, in working days.
    catalog_revision_days: u32,
    /// Deadline of a demand's assignment, in working days.
    demand_assignment_days: u32,
    /// Deadline of a demand's answer, in working days.
    demand_answer_days: u32,
}

impl Default for WorkCalendar {
    /// The default calendar: +08:00, no holidays configured, 5/5/7 working days.
    fn default() -> Self {
        let config = CalendarConfig::default();
        Self {
            offset: UtcOffset::UTC,
            holidays: BTreeSet::new(),
            makeup: BTreeSet::new(),
            approval_days: config.approval_days,
            objection_days: config.objection_days,
            catalog_revision_days: config.catalog_revision_days,
            demand_assignment_days: config.demand_assignment_days,
            demand_answer_days: config.demand_answer_days,
        }
        .with_offset_hours(config.utc_offset_hours)
    }
}

impl WorkCalendar {
    /// Validates a configuration and builds the calendar from it.
    pub fn new(config: &CalendarConfig) -> Result<Self, CalendarError> {
        check_range(
            "utc_offset_hours",
            i64::from(config.utc_offset_hours),
            (i64::from(OFFSET_RANGE.0), i64::from(OFFSET_RANGE.1)),
        )?;
        check_days("approval_days", config.approval_days, APPROVAL_DAYS_RANGE)?;
        check_days("objection_days", config.objection_days, OTHER_DAYS_RANGE)?;
        check_days(
            "catalog_revision_days",
            config.catalog_revision_days,
            OTHER_DAYS_RANGE,
        )?;
        check_days(
            "demand_assignment_days",
            config.demand_assignment_days,
            OTHER_DAYS_RANGE,
        )?;
        check_days(
            "demand_answer_days",
            config.demand_answer_days,
            OTHER_DAYS_RANGE,
        )?;

        let mut holidays = BTreeSet::new();
        for value in &config.holidays {
            holidays.extend(parse_holiday(value)?);
        }
        let mut makeup = BTreeSet::new();
        for value in &config.makeup_workdays {
            let date = parse_date(value, "makeup_workdays", "")?;
            if !is_weekend(date) {
                return Err(CalendarError::MakeupOnWeekday {
                    value: value.clone(),
                    weekday: date.weekday(),
                });
            }
            if holidays.contains(&date) {
                return Err(CalendarError::HolidayAndMakeup {
                    date: format_date(date),
                });
            }
            makeup.insert(date);
        }

        Ok(Self {
            offset: UtcOffset::UTC,
            holidays,
            makeup,
            approval_days: config.approval_days,
            objection_days: config.objection_days,
            catalog_revision_days: config.catalog_revision_days,
            demand_assignment_days: config.demand_assignment_days,
            demand_answer_days: config.demand_answer_days,
        }
        .with_offset_hours(config.utc_offset_hours))
    }

    /// Sets the offset from whole hours already checked to lie in [`OFFSET_RANGE`].
    fn with_offset_hours(mut self, hours: i8) -> Self {
        // In range by construction; UTC would only be reached for an impossible input.
        self.offset = UtcOffset::from_hms(hours, 0, 0).unwrap_or(UtcOffset::UTC);
        self
    }

    /// The local offset dates are taken in.
    pub fn utc_offset(&self) -> UtcOffset {
        self.offset
    }

    /// Working days an application may wait for a decision.
    pub fn approval_days(&self) -> u32 {
        self.approval_days
    }

    /// Working days an objection may wait for an answer.
    pub fn objection_days(&self) -> u32 {
        self.objection_days
    }

    /// Working days a catalog entry may wait for revision after its provider changed.
    pub fn catalog_revision_days(&self) -> u32 {
        self.catalog_revision_days
    }

    /// Whether `date` is a working day: a make-up day, or a weekday that is not a holiday.
    pub fn is_working_day(&self, date: Date) -> bool {
        if self.makeup.contains(&date) {
            return true;
        }
        !is_weekend(date) && !self.holidays.contains(&date)
    }

    /// The local calendar date of an instant.
    pub fn local_date(&self, at: OffsetDateTime) -> Date {
        match at.checked_to_offset(self.offset) {
            Some(local) => local.date(),
            // Only at the very ends of the representable range; the date as given is the best answer.
            None => at.date(),
        }
    }

    /// End of the `n`-th working day strictly after the local date of `from` (n = 0: end of `from`'s own
    /// day), as the exclusive instant 00:00 local time of the following calendar day.
    pub fn add_working_days(&self, from: OffsetDateTime, n: u32) -> OffsetDateTime {
        let mut date = self.local_date(from);
        let mut left = n;
        while left > 0 {
            match date.next_day() {
                Some(next) => date = next,
                None => break,
            }
            if self.is_working_day(date) {
                left -= 1;
            }
        }
        self.end_of_day(date)
    }

    /// Number of working days in the half-open date range (`from`, `to`]; 0 when `to` is not after `from`.
    pub fn working_days_between(&self, from: Date, to: Date) -> u32 {
        let mut count = 0u32;
        let mut date = from;
        while date < to {
            match date.next_day() {
                Some(next) => date = next,
                None => break,
            }
            if self.is_working_day(date) {
                count = count.saturating_add(1);
            }
        }
        count
    }

    /// Whether something due at `due` (a deadline from this calendar) is overdue at `now`.
    pub fn is_overdue(&self, due: OffsetDateTime, now: OffsetDateTime) -> bool {
        now >= due
    }

    /// Deadline for deciding an application filed at `filed` ([`Self::approval_days`] working days).
    pub fn approval_deadline(&self, filed: OffsetDateTime) -> OffsetDateTime {
        self.add_working_days(filed, self.approval_days)
    }

    /// Deadline for answering an objection filed at `filed` ([`Self::objection_days`] working days).
    pub fn objection_deadline(&self, filed: OffsetDateTime) -> OffsetDateTime {
        self.add_working_days(filed, self.objection_days)
    }

    /// Working days a filed demand may wait for its assignment.
    pub fn demand_assignment_days(&self) -> u32 {
        self.demand_assignment_days
    }

    /// Working days an assigned demand may wait for its provider's answer.
    pub fn demand_answer_days(&self) -> u32 {
        self.demand_answer_days
    }

    /// Deadline for assigning a demand filed at `filed` ([`Self::demand_assignment_days`] working days).
    pub fn demand_assignment_deadline(&self, filed: OffsetDateTime) -> OffsetDateTime {
        self.add_working_days(filed, self.demand_assignment_days)
    }

    /// Deadline for answering a demand assigned at `assigned` ([`Self::demand_answer_days`] working days).
    pub fn demand_answer_deadline(&self, assigned: OffsetDateTime) -> OffsetDateTime {
        self.add_working_days(assigned, self.demand_answer_days)
    }

    /// Deadline for revising a catalog entry whose provider changed at `changed`.
    pub fn catalog_revision_deadline(&self, changed: OffsetDateTime) -> OffsetDateTime {
        self.add_working_days(changed, self.catalog_revision_days)
    }

    /// 00:00 local time of the day after `date` (the last representable instant of `date` at the far end).
    fn end_of_day(&self, date: Date) -> OffsetDateTime {
        let start = PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_offset(self.offset);
        start
            .checked_add(Duration::DAY)
            .unwrap_or_else(|| start.replace_time(Time::MAX))
    }
}

/// Saturday or Sunday.
fn is_weekend(date: Date) -> bool {
    matches!(date.weekday(), Weekday::Saturday | Weekday::Sunday)
}

/// `YYYY-MM-DD` of a date.
fn format_date(date: Date) -> String {
    date.format(DATE_FORMAT)
        .unwrap_or_else(|_| date.to_string())
}

/// Parses one `YYYY-MM-DD` string from configuration list `list`.
fn parse_date(
    value: &str,
    list: &'static str,
    range_hint: &'static str,
) -> Result<Date, CalendarError> {
    Date::parse(value, DATE_FORMAT).map_err(|e| CalendarError::BadDate {
        list,
        value: value.to_owned(),
        reason: e.to_string(),
        range_hint,
    })
}

/// Parses a holiday entry: one date or an inclusive `FROM..TO` range.
fn parse_holiday(value: &str) -> Result<Vec<Date>, CalendarError> {
    const HINT: &str = " or \"YYYY-MM-DD..YYYY-MM-DD\"";
    let Some((from, to)) = value.split_once("..") else {
        return Ok(vec![parse_date(value, "holidays", HINT)?]);
    };
    let from = parse_date(from, "holidays", HINT)?;
    let to = parse_date(to, "holidays", HINT)?;
    if to < from {
        return Err(CalendarError::BadRange {
            value: value.to_owned(),
            reason: "ends before it starts".into(),
        });
    }
    let span = (to - from).whole_days();
    if span >= MAX_RANGE_DAYS {
        return Err(CalendarError::BadRange {
            value: value.to_owned(),
            reason: format!(
                "spans {} days; at most {MAX_RANGE_DAYS} are allowed",
                span + 1
            ),
        });
    }
    let mut dates = vec![from];
    let mut date = from;
    while date < to {
        match date.next_day() {
            Some(next) => date = next,
            None => break,
        }
        dates.push(date);
    }
    Ok(dates)
}

/// Checks a working-day count against its allowed range.
fn check_days(
    setting: &'static str,
    value: u32,
    (min, max): (u32, u32),
) -> Result<(), CalendarError> {
    check_range(setting, i64::from(value), (i64::from(min), i64::from(max)))
}

/// Checks a numeric setting against its allowed range.
fn check_range(
    setting: &'static str,
    value: i64,
    (min, max): (i64, i64),
) -> Result<(), CalendarError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(CalendarError::OutOfRange {
            setting,
            value,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    /// The 2024 National Day schedule: 10-01..10-07 off, Sun 09-29 and Sat 10-12 worked.
    fn national_day_2024() -> WorkCalendar {
        let config = CalendarConfig {
            holidays: (1..=7).map(|d| format!("2024-10-{d:02}")).collect(),
            makeup_workdays: vec!["2024-09-29".into(), "2024-10-12".into()],
            ..CalendarConfig::default()
        };
        WorkCalendar::new(&config).unwrap()
    }

    #[test]
    fn default_config_is_valid_and_matches_defaults() {
        let config = CalendarConfig::default();
        assert_eq!(config.utc_offset_hours, 8);
        assert_eq!(
            (
                config.approval_days,
                config.objection_days,
                config.catalog_revision_days
            ),
            (5, 5, 7)
        );
        let cal = WorkCalendar::new(&config).unwrap();
        assert_eq!(cal.utc_offset(), UtcOffset::from_hms(8, 0, 0).unwrap());
        let dflt = WorkCalendar::default();
        assert_eq!(dflt.utc_offset(), cal.utc_offset());
        assert_eq!(dflt.approval_days(), 5);
    }

    #[test]
    fn working_days_around_national_day_2024() {
        let cal = national_day_2024();
        assert!(!cal.is_working_day(date!(2024 - 09 - 28)), "Saturday");
        assert!(cal.is_working_day(date!(2024 - 09 - 29)), "make-up Sunday");
        assert!(cal.is_working_day(date!(2024 - 09 - 30)));
        for d in 1..=7 {
            let day = Date::from_calendar_date(2024, time::Month::October, d).unwrap();
            assert!(!cal.is_working_day(day), "holiday {day}");
        }
        assert!(cal.is_working_day(date!(2024 - 10 - 08)));
        assert!(
            cal.is_working_day(date!(2024 - 10 - 12)),
            "make-up Saturday"
        );
        assert!(!cal.is_working_day(date!(2024 - 10 - 13)), "Sunday");
    }

    #[test]
    fn five_working_days_across_holiday_and_makeup_day() {
        let cal = national_day_2024();
        // Fri 09-27 → Sun 09-29 (make-up), Mon 09-30, [10-01..10-07 off], Tue 10-08, Wed 10-09, Thu 10-10.
        let filed = datetime!(2024-09-27 10:00 +8);
        let due = cal.approval_deadline(filed);
        assert_eq!(due, datetime!(2024-10-11 00:00 +8));
        assert_eq!(cal.objection_deadline(filed), due);
        assert_eq!(
            cal.local_date(due - Duration::NANOSECOND),
            date!(2024 - 10 - 10)
        );
        assert!(!cal.is_overdue(due, datetime!(2024-10-10 23:59:59 +8)));
        assert!(cal.is_overdue(due, datetime!(2024-10-11 00:00 +8)));
        assert!(
            cal.is_overdue(due, datetime!(2024-10-10 16:00 UTC)),
            "same instant in UTC"
        );
        assert!(!cal.is_overdue(due, datetime!(2024-10-10 15:59:59 UTC)));
    }

    #[test]
    fn catalog_revision_uses_seven_days_and_the_makeup_saturday() {
        let cal = national_day_2024();
        // Tue 10-08 + 7: 10-09, 10-10, 10-11, Sat 10-12 (make-up), 10-14, 10-15, 10-16.
        let due = cal.catalog_revision_deadline(datetime!(2024-10-08 09:00 +8));
        assert_eq!(due, datetime!(2024-10-17 00:00 +8));
    }

    #[test]
    fn plain_week_monday_plus_five_is_next_monday() {
        let cal = WorkCalendar::new(&CalendarConfig::default()).unwrap();
        let due = cal.add_working_days(datetime!(2024-06-03 09:30 +8), 5);
        assert_eq!(due, datetime!(2024-06-11 00:00 +8));
        assert_eq!(
            cal.local_date(due - Duration::NANOSECOND),
            date!(2024 - 06 - 10)
        );
    }

    #[test]
    fn zero_days_is_end_of_the_same_day() {
        let cal = WorkCalendar::default();
        assert_eq!(
            cal.add_working_days(datetime!(2024-06-03 09:30 +8), 0),
            datetime!(2024-06-04 00:00 +8)
        );
        // Also on a day off: the deadline is the end of that same calendar day.
        assert_eq!(
            cal.add_working_days(datetime!(2024-06-08 09:30 +8), 0),
            datetime!(2024-06-09 00:00 +8)
        );
    }

    #[test]
    fn weekends_are_skipped() {
        let cal = WorkCalendar::default();
        // Thu + 2 = Mon; Fri + 1 = Mon; Sat + 1 = Mon; Sun + 1 = Mon.
        assert_eq!(
            cal.add_working_days(datetime!(2024-06-06 12:00 +8), 2),
            datetime!(2024-06-11 00:00 +8)
        );
        for day in 7..=9u8 {
            let from = PrimitiveDateTime::new(
                Date::from_calendar_date(2024, time::Month::June, day).unwrap(),
                Time::from_hms(12, 0, 0).unwrap(),
            )
            .assume_offset(cal.utc_offset());
            assert_eq!(
                cal.add_working_days(from, 1),
                datetime!(2024-06-11 00:00 +8),
                "from June {day}"
            );
        }
    }

    #[test]
    fn utc_offset_decides_the_local_date() {
        let cal = national_day_2024();
        // 2024-09-27T20:00Z is already Saturday 04:00 in +08:00: the count starts from Saturday, so the
        // make-up Sunday is the first day and the result equals filing on Friday.
        let late_friday_utc = datetime!(2024-09-27 20:00 UTC);
        assert_eq!(cal.local_date(late_friday_utc), date!(2024 - 09 - 28));
        assert_eq!(
            cal.approval_deadline(late_friday_utc),
            datetime!(2024-10-11 00:00 +8)
        );
        // n = 0 shows the day boundary moved: end of Saturday, not of Friday.
        assert_eq!(
            cal.add_working_days(late_friday_utc, 0),
            datetime!(2024-09-29 00:00 +8)
        );

        // The same instant in a UTC calendar is still Friday.
        let utc = WorkCalendar::new(&CalendarConfig {
            utc_offset_hours: 0,
            ..CalendarConfig::default()
        })
        .unwrap();
        assert_eq!(utc.local_date(late_friday_utc), date!(2024 - 09 - 27));
        assert_eq!(
            utc.add_working_days(late_friday_utc, 0),
            datetime!(2024-09-28 00:00 UTC)
        );
        // Fri + 1 in a plain calendar = Mon 09-30.
        assert_eq!(
            utc.add_working_days(late_friday_utc, 1),
            datetime!(2024-10-01 00:00 UTC)
        );
    }

    #[test]
    fn working_days_between_across_the_holiday() {
        let cal = national_day_2024();
        // (09-27, 10-10]: 09-29, 09-30, 10-08, 10-09, 10-10.
        assert_eq!(
            cal.working_days_between(date!(2024 - 09 - 27), date!(2024 - 10 - 10)),
            5
        );
        // (09-30, 10-07]: nothing but holidays.
        assert_eq!(
            cal.working_days_between(date!(2024 - 09 - 30), date!(2024 - 10 - 07)),
            0
        );
        // (10-11, 10-14]: make-up Saturday and Monday.
        assert_eq!(
            cal.working_days_between(date!(2024 - 10 - 11), date!(2024 - 10 - 14)),
            2
        );
        assert_eq!(
            cal.working_days_between(date!(2024 - 10 - 10), date!(2024 - 10 - 10)),
            0
        );
        assert_eq!(
            cal.working_days_between(date!(2024 - 10 - 10), date!(2024 - 10 - 01)),
            0
        );
        // Consistent with add_working_days.
        let filed = datetime!(2024-09-27 10:00 +8);
        let last = cal.local_date(cal.add_working_days(filed, 5) - Duration::NANOSECOND);
        assert_eq!(cal.working_days_between(cal.local_date(filed), last), 5);
    }

    #[test]
    fn holiday_ranges_are_accepted() {
        let config = CalendarConfig {
            holidays: vec!["2024-10-01..2024-10-07".into()],
            makeup_workdays: vec!["2024-09-29".into(), "2024-10-12".into()],
            ..CalendarConfig::default()
        };
        let cal = WorkCalendar::new(&config).unwrap();
        assert_eq!(cal.holidays, national_day_2024().holidays);
        let backwards = CalendarConfig {
            holidays: vec!["2024-10-07..2024-10-01".into()],
            ..CalendarConfig::default()
        };
        let err = WorkCalendar::new(&backwards).unwrap_err();
        assert!(matches!(err, CalendarError::BadRange { .. }), "{err}");
        assert!(err.to_string().contains("2024-10-07..2024-10-01"), "{err}");
    }

    #[test]
    fn bad_date_string_is_named() {
        let config = CalendarConfig {
            holidays: vec!["2024-13-01".into()],
            ..CalendarConfig::default()
        };
        let err = WorkCalendar::new(&config).unwrap_err();
        assert!(
            matches!(&err, CalendarError::BadDate { list: "holidays", value, .. } if value == "2024-13-01")
        );
        assert!(err.to_string().contains("\"2024-13-01\""), "{err}");

        let config = CalendarConfig {
            makeup_workdays: vec!["29/09/2024".into()],
            ..CalendarConfig::default()
        };
        let err = WorkCalendar::new(&config).unwrap_err();
        assert!(
            err.to_string().contains("makeup_workdays") && err.to_string().contains("29/09/2024"),
            "{err}"
        );
    }

    #[test]
    fn demand_deadlines_count_working_days_and_are_bounded() {
        let cal = WorkCalendar::new(&CalendarConfig {
            holidays: (1..=7).map(|d| format!("2024-10-{d:02}")).collect(),
            makeup_workdays: vec!["2024-09-29".into(), "2024-10-12".into()],
            demand_assignment_days: 2,
            demand_answer_days: 3,
            ..CalendarConfig::default()
        })
        .unwrap();
        // Filed Monday 09-30: 2 working days skip the holiday to 10-08 and 10-09.
        let filed = datetime!(2024-09-30 10:00 +8);
        assert_eq!(
            cal.demand_assignment_deadline(filed),
            datetime!(2024-10-10 00:00 +8)
        );
        // Assigned Friday 10-11: the make-up Saturday counts, then Monday and Tuesday.
        assert_eq!(
            cal.demand_answer_deadline(datetime!(2024-10-11 16:00 +8)),
            datetime!(2024-10-16 00:00 +8)
        );
        for (setting, config) in [
            (
                "demand_assignment_days",
                CalendarConfig {
                    demand_assignment_days: 0,
                    ..CalendarConfig::default()
                },
            ),
            (
                "demand_answer_days",
                CalendarConfig {
                    demand_answer_days: 31,
                    ..CalendarConfig::default()
                },
            ),
        ] {
            let err = WorkCalendar::new(&config).unwrap_err();
            assert!(
                matches!(err, CalendarError::OutOfRange { setting: s, .. } if s == setting),
                "{err}"
            );
        }
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let err = WorkCalendar::new(&CalendarConfig {
            approval_days: 11,
            ..CalendarConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            err,
            CalendarError::OutOfRange {
                setting: "approval_days",
                value: 11,
                min: 2,
                max: 10
            }
        );
        assert_eq!(
            err.to_string(),
            "calendar approval_days = 11 is out of range; allowed 2 to 10"
        );
        let err = WorkCalendar::new(&CalendarConfig {
            approval_days: 1,
            ..CalendarConfig::default()
        })
        .unwrap_err();
        assert!(matches!(
            err,
            CalendarError::OutOfRange {
                setting: "approval_days",
                value: 1,
                ..
            }
        ));
        for days in [2, 10] {
            assert!(
                WorkCalendar::new(&CalendarConfig {
                    approval_days: days,
                    ..CalendarConfig::default()
                })
                .is_ok()
            );
        }
        let err = WorkCalendar::new(&CalendarConfig {
            objection_days: 0,
            ..CalendarConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("objection_days = 0"), "{err}");
        let err = WorkCalendar::new(&CalendarConfig {
            utc_offset_hours: 15,
            ..CalendarConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("utc_offset_hours = 15"), "{err}");
    }

    #[test]
    fn holiday_and_makeup_on_the_same_day_is_an_error() {
        let config = CalendarConfig {
            holidays: vec!["2024-10-05".into()],
            makeup_workdays: vec!["2024-10-05".into()],
            ..CalendarConfig::default()
        };
        let err = WorkCalendar::new(&config).unwrap_err();
        assert_eq!(
            err,
            CalendarError::HolidayAndMakeup {
                date: "2024-10-05".into()
            }
        );
        assert!(err.to_string().contains("2024-10-05"), "{err}");
    }

    #[test]
    fn makeup_day_on_a_weekday_is_an_error() {
        let config = CalendarConfig {
            makeup_workdays: vec!["2024-09-30".into()],
            ..CalendarConfig::default()
        };
        let err = WorkCalendar::new(&config).unwrap_err();
        assert!(
            matches!(
                err,
                CalendarError::MakeupOnWeekday {
                    weekday: Weekday::Monday,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("\"2024-09-30\" is a Monday"),
            "{err}"
        );
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
        let config: CalendarConfig =
            serde_json::from_str(r#"{"holidays":["2024-10-01"],"approval_days":3}"#).unwrap();
        assert_eq!(config.approval_days, 3);
        assert_eq!(config.utc_offset_hours, 8);
        assert_eq!(config.catalog_revision_days, 7);
        assert!(serde_json::from_str::<CalendarConfig>(r#"{"aproval_days":3}"#).is_err());
    }
}
