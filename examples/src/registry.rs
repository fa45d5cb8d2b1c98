//! A synthetic civil-affairs registry: residents with valid GB 11643 ID numbers, households and marriages.
//!
//! The data is generated deterministically from a seed with a splitmix64 generator, so the same
//! `(area_code, seed, count)` always yields the same people in the same order. Two resources are served from it:
//! [`Resource::Household`] (户籍登记) and [`Resource::Marriage`] (婚姻登记), both keyed by `id_number`.
//!
//! Values are text: dates are `YYYY-MM-DD`, gender is `male`/`female`, marital status is one of
//! `unmarried`, `married`, `divorced`, `widowed`; fields that do not apply (a single person's spouse) are empty.

use std::collections::{HashMap, HashSet};
use std::fmt;

use fedgate_proto::v1::Record;

/// Name of the key field of every registry resource.
pub const KEY_FIELD: &str = "id_number";

/// Largest registry [`Registry::generate`] accepts.
pub const MAX_PERSONS: usize = 2_000_000;

/// Year the registry is "as of": ages and marriage dates are computed against it.
const REFERENCE_YEAR: u32 = 2024;
/// First birth year generated.
const FIRST_BIRTH_YEAR: u32 = 1950;
/// Last birth year generated.
const LAST_BIRTH_YEAR: u32 = 2005;
/// Legal marriage age of men in China.
const MALE_MARRIAGE_AGE: u32 = 22;
/// Legal marriage age of women in China.
const FEMALE_MARRIAGE_AGE: u32 = 20;

/// ISO 7064 MOD 11-2 weights of the first 17 digits of a resident ID number.
const ID_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
/// Check character by weighted sum modulo 11.
const ID_CHECK_CHARS: &[u8; 11] = b"10X98765432";

const SURNAMES: &[&str] = &[
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
    "何", "林", "罗", "高", "郑", "梁", "谢", "宋", "唐", "许", "韩", "冯", "邓", "曹", "彭", "曾",
    "肖", "田", "董", "潘",
];

const GIVEN_CHARS: &[&str] = &[
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明",
    "超", "秀", "霞", "平", "刚", "桂", "英", "华", "建", "文", "辉", "玲", "婷", "鑫", "宇", "浩",
    "晨", "欣", "怡", "志", "海", "燕", "红", "斌", "琳", "雪", "峰", "凯", "佳", "思", "子", "梓",
    "涵", "瑞",
];

const STREETS: &[&str] = &[
    "五一",
    "八一七",
    "湖东",
    "乌山",
    "杨桥",
    "东街",
    "铜盘",
    "西洪",
    "白马",
    "温泉",
    "华林",
    "福飞",
    "屏西",
    "梦山",
    "鼓屏",
    "北环",
    "工业",
    "江滨",
];

const PHONE_PREFIXES: &[&str] = &[
    "130", "131", "132", "133", "134", "135", "136", "137", "138", "139", "150", "151", "152",
    "153", "155", "156", "157", "158", "159", "180", "181", "182", "183", "184", "185", "186",
    "187", "188", "189",
];

/// Why a registry could not be generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// The area code is not 6 ASCII digits.
    InvalidAreaCode(String),
    /// The requested count is larger than [`MAX_PERSONS`].
    TooMany(usize),
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidAreaCode(code) => {
                write!(
                    f,
                    "area code {code:?} is not a 6-digit administrative division code"
                )
            }
            Self::TooMany(n) => write!(f, "cannot generate {n} persons (at most {MAX_PERSONS})"),
        }
    }
}

impl std::error::Error for RegistryError {}

/// The two resources a [`Registry`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// Household registration (户籍登记): local code `household`.
    Household,
    /// Marriage registration (婚姻登记): local code `marriage`.
    Marriage,
}

impl Resource {
    /// Every resource, in catalog order.
    pub const ALL: [Resource; 2] = [Resource::Household, Resource::Marriage];

    /// The local code of the resource, the part of its resource id after the node code.
    pub fn local_code(self) -> &'static str {
        match self {
            Self::Household => "household",
            Self::Marriage => "marriage",
        }
    }

    /// The resource with this local code, if any.
    pub fn from_local_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.local_code() == code)
    }

    /// The field names of the resource's records, key field first.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Household => &[
                "id_number",
                "name",
                "gender",
                "birth_date",
                "address",
                "household_no",
                "phone",
            ],
            Self::Marriage => &[
                "id_number",
                "name",
                "marital_status",
                "spouse_id_number",
                "marriage_date",
                "registration_office",
            ],
        }
    }
}

/// Gender as recorded in the registry and encoded in the 17th digit of the ID number (odd: male).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gender {
    /// Male (男).
    Male,
    /// Female (女).
    Female,
}

impl Gender {
    /// The value used in records: `male` or `female`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Male => "male",
            Self::Female => "female",
        }
    }
}

/// Marital status as recorded by the civil-affairs bureau.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaritalStatus {
    /// Never married (未婚).
    Unmarried,
    /// Married (已婚); the spouse fields are set.
    Married,
    /// Divorced (离婚).
    Divorced,
    /// Widowed (丧偶).
    Widowed,
}

impl MaritalStatus {
    /// The value used in records: `unmarried`, `married`, `divorced` or `widowed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unmarried => "unmarried",
            Self::Married => "married",
            Self::Divorced => "divorced",
            Self::Widowed => "widowed",
        }
    }
}

/// One resident of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// 18-character resident ID number (GB 11643) with a valid check character.
    pub id_number: String,
    /// Name: a surname and one or two given characters.
    pub name: String,
    /// Gender, consistent with the ID number.
    pub gender: Gender,
    /// Birth date `YYYY-MM-DD`, consistent with the ID number.
    pub birth_date: String,
    /// Mobile phone number, 11 digits.
    pub phone: String,
    /// Residential address including province, city and district where known.
    pub address: String,
    /// Household registration number (户号); married couples share one.
    pub household_no: String,
    /// Marital status.
    pub marital_status: MaritalStatus,
    /// ID number of the spouse when married, else empty.
    pub spouse_id_number: String,
    /// Marriage date `YYYY-MM-DD` when married, else empty.
    pub marriage_date: String,
    /// Office that registered the marriage when married, else empty.
    pub registration_office: String,
}

impl Person {
    /// The value of one record field, or `None` for a name that is not a registry field.
    pub fn field(&self, name: &str) -> Option<&str> {
        Some(match name {
            "id_number" => &self.id_number,
            "name" => &self.name,
            "gender" => self.gender.as_str(),
            "birth_date" => &self.birth_date,
            "phone" => &self.phone,
            "address" => &self.address,
            "household_no" => &self.household_no,
            "marital_status" => self.marital_status.as_str(),
            "spouse_id_number" => &self.spouse_id_number,
            "marriage_date" => &self.marriage_date,
            "registration_office" => &self.registration_office,
            _ => return None,
        })
    }

    /// This person's record of `resource`, limited to `fields` (every field of the resource when empty).
    ///
    /// Requested names that are not fields of the resource are ignored.
    pub fn record(&self, resource: Resource, fields: &[String]) -> Record {
        let values = resource
            .fields()
            .iter()
            .filter(|f| fields.is_empty() || fields.iter().any(|w| w == *f))
            .filter_map(|f| self.field(f).map(|v| ((*f).to_owned(), v.to_owned())))
            .collect();
        Record { values }
    }
}

/// A deterministic, in-memory civil-affairs registry indexed by ID number.
#[derive(Debug, Clone)]
pub struct Registry {
    area_code: String,
    persons: Vec<Person>,
    by_id: HashMap<String, usize>,
}

impl Registry {
    /// Generates `count` residents of the division `area_code` (6 digits) from `seed`; same inputs, same data.
    pub fn generate(area_code: &str, seed: u64, count: usize) -> Result<Self, RegistryError> {
        if area_code.len() != 6 || !area_code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RegistryError::InvalidAreaCode(area_code.to_owned()));
        }
        if count > MAX_PERSONS {
            return Err(RegistryError::TooMany(count));
        }
        let mut rng = SplitMix64::new(seed);
        let district = district_name(area_code);
        let office = format!("{district}民政局婚姻登记处");
        let mut used: HashSet<String> = HashSet::with_capacity(count * 2);
        let mut persons = Vec::with_capacity(count);
        for i in 0..count {
            let gender = if rng.below(2) == 0 {
                Gender::Male
            } else {
                Gender::Female
            };
            let (year, month, day) = random_birth_date(&mut rng);
            let id_number = unique_id(&mut rng, &mut used, area_code, (year, month, day), gender);
            let age = REFERENCE_YEAR - year;
            let legal = match gender {
                Gender::Male => MALE_MARRIAGE_AGE,
                Gender::Female => FEMALE_MARRIAGE_AGE,
            };
            let marital_status = if age < legal {
                MaritalStatus::Unmarried
            } else {
                let widowed_chance = if age >= 60 { 12 } else { 2 };
                let r = rng.below(100) as u32;
                if r < 15 {
                    MaritalStatus::Unmarried
                } else if r < 25 {
                    MaritalStatus::Divorced
                } else if r < 25 + widowed_chance {
                    MaritalStatus::Widowed
                } else {
                    MaritalStatus::Married
                }
            };
            let given_len = 1 + rng.below(2) as usize;
            let mut name = pick(&mut rng, SURNAMES).to_owned();
            for _ in 0..given_len {
                name.push_str(pick(&mut rng, GIVEN_CHARS));
            }
            let phone = format!(
                "{}{:08}",
                pick(&mut rng, PHONE_PREFIXES),
                rng.below(100_000_000)
            );
            let address = format!(
                "{district}{}路{}号{}栋{}室",
                pick(&mut rng, STREETS),
                1 + rng.below(300),
                1 + rng.below(20),
                100 * (1 + rng.below(30)) + 1 + rng.below(4),
            );
            let household_no = format!("{area_code}{:07}", i + 1);
            persons.push(Person {
                id_number,
                name,
                gender,
                birth_date: format!("{year:04}-{month:02}-{day:02}"),
                phone,
                address,
                household_no,
                marital_status,
                spouse_id_number: String::new(),
                marriage_date: String::new(),
                registration_office: String::new(),
            });
        }
        pair_spouses(&mut rng, &mut persons, &mut used, area_code, &office);
        let by_id = persons
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id_number.clone(), i))
            .collect();
        Ok(Self {
            area_code: area_code.to_owned(),
            persons,
            by_id,
        })
    }

    /// The division code the residents' ID numbers start with.
    pub fn area_code(&self) -> &str {
        &self.area_code
    }

    /// Number of residents.
    pub fn len(&self) -> usize {
        self.persons.len()
    }

    /// Whether the registry has no residents.
    pub fn is_empty(&self) -> bool {
        self.persons.is_empty()
    }

    /// The `i`-th resident in generation order.
    pub fn person(&self, i: usize) -> Option<&Person> {
        self.persons.get(i)
    }

    /// Every resident in generation order.
    pub fn persons(&self) -> &[Person] {
        &self.persons
    }

    /// The ID numbers of every resident in generation order.
    pub fn id_numbers(&self) -> impl Iterator<Item = &str> + '_ {
        self.persons.iter().map(|p| p.id_number.as_str())
    }

    /// The ID number of the `i`-th resident, for examples and tests.
    pub fn sample_id(&self, i: usize) -> Option<&str> {
        self.persons.get(i).map(|p| p.id_number.as_str())
    }

    /// The resident with this ID number (a trailing lowercase `x` is accepted), in O(1).
    pub fn find(&self, id_number: &str) -> Option<&Person> {
        let id = id_number.trim();
        let index = match self.by_id.get(id) {
            Some(i) => Some(*i),
            None if id.ends_with('x') => self.by_id.get(&id.to_ascii_uppercase()).copied(),
            None => None,
        };
        index.and_then(|i| self.persons.get(i))
    }

    /// The record of `resource` for this ID number, limited to `fields` (all when empty).
    pub fn lookup(&self, resource: Resource, id_number: &str, fields: &[String]) -> Option<Record> {
        self.find(id_number).map(|p| p.record(resource, fields))
    }
}

/// The ISO 7064 MOD 11-2 check character for the first 17 digits of an ID number, or `None` if they are not
/// 17 ASCII digits.
pub fn id_check_char(first17: &str) -> Option<char> {
    if first17.len() != 17 {
        return None;
    }
    let mut sum = 0u32;
    for (c, w) in first17.chars().zip(ID_WEIGHTS) {
        sum += c.to_digit(10)? * w;
    }
    ID_CHECK_CHARS
        .get((sum % 11) as usize)
        .map(|b| char::from(*b))
}

/// Whether `id` is a well-formed 18-character resident ID number: digits, a real birth date and a correct
/// check character (uppercase `X`).
pub fn is_valid_id_number(id: &str) -> bool {
    if id.len() != 18 || !id.is_ascii() {
        return false;
    }
    let (body, check) = id.split_at(17);
    let Some(expected) = id_check_char(body) else {
        return false;
    };
    if !check.starts_with(expected) {
        return false;
    }
    let num = |s: &str| s.parse::<u32>().ok();
    match (num(&body[6..10]), num(&body[10..12]), num(&body[12..14])) {
        (Some(y), Some(m), Some(d)) => is_real_date(y, m, d),
        _ => false,
    }
}

/// Whether `y-m-d` is a date of the Gregorian calendar (years 1800..=2100).
fn is_real_date(y: u32, m: u32, d: u32) -> bool {
    (1800..=2100).contains(&y) && (1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m)
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400) => 29,
        2 => 28,
        _ => 0,
    }
}

/// A readable name for the division, used in addresses and office names.
fn district_name(code: &str) -> String {
    let known = match code {
        "350000" => "福建省",
        "350100" => "福建省福州市",
        "350102" => "福建省福州市鼓楼区",
        "350103" => "福建省福州市台江区",
        "350104" => "福建省福州市仓山区",
        "350105" => "福建省福州市马尾区",
        "350111" => "福建省福州市晋安区",
        "350112" => "福建省福州市长乐区",
        "350200" => "福建省厦门市",
        "350203" => "福建省厦门市思明区",
        "350206" => "福建省厦门市湖里区",
        "350300" => "福建省莆田市",
        "350302" => "福建省莆田市城厢区",
        "350500" => "福建省泉州市",
        "350502" => "福建省泉州市鲤城区",
        _ => "",
    };
    if known.is_empty() {
        format!("行政区划{code}")
    } else {
        known.to_owned()
    }
}

fn random_birth_date(rng: &mut SplitMix64) -> (u32, u32, u32) {
    let year =
        FIRST_BIRTH_YEAR + rng.below(u64::from(LAST_BIRTH_YEAR - FIRST_BIRTH_YEAR + 1)) as u32;
    let month = 1 + rng.below(12) as u32;
    let day = 1 + rng.below(u64::from(days_in_month(year, month))) as u32;
    (year, month, day)
}

/// Draws sequence numbers until the ID number is new; the last sequence digit carries the gender.
fn unique_id(
    rng: &mut SplitMix64,
    used: &mut HashSet<String>,
    area: &str,
    (year, month, day): (u32, u32, u32),
    gender: Gender,
) -> String {
    loop {
        // 500 sequence numbers per gender and day; the capacity (>10 million per gender) is far above MAX_PERSONS.
        let base = rng.below(500) as u32 * 2;
        let seq = match gender {
            Gender::Male => base + 1,
            Gender::Female => base,
        };
        let body = format!("{area}{year:04}{month:02}{day:02}{seq:03}");
        let check = id_check_char(&body).unwrap_or('0');
        let id = format!("{body}{check}");
        if used.insert(id.clone()) {
            return id;
        }
    }
}

/// Pairs married residents of opposite gender into couples sharing a household; residents left over get a
/// spouse from outside the registry.
fn pair_spouses(
    rng: &mut SplitMix64,
    persons: &mut [Person],
    used: &mut HashSet<String>,
    area: &str,
    office: &str,
) {
    let mut waiting_men = Vec::new();
    let mut waiting_women = Vec::new();
    let mut couples = Vec::new();
    for (i, p) in persons.iter().enumerate() {
        if p.marital_status != MaritalStatus::Married {
            continue;
        }
        let (mine, other) = match p.gender {
            Gender::Male => (&mut waiting_men, &mut waiting_women),
            Gender::Female => (&mut waiting_women, &mut waiting_men),
        };
        match other.pop() {
            Some(j) => couples.push((j, i)),
            None => mine.push(i),
        }
    }
    for (a, b) in couples {
        let (first, second) = (&persons[a], &persons[b]);
        let (man, woman) = match first.gender {
            Gender::Male => (first, second),
            Gender::Female => (second, first),
        };
        let since =
            (birth_year(man) + MALE_MARRIAGE_AGE).max(birth_year(woman) + FEMALE_MARRIAGE_AGE);
        let date = random_date_between(rng, since, REFERENCE_YEAR);
        let household = persons[a].household_no.clone();
        let address = persons[a].address.clone();
        let id_a = persons[a].id_number.clone();
        let id_b = persons[b].id_number.clone();
        for (k, spouse) in [(a, id_b), (b, id_a)] {
            let p = &mut persons[k];
            p.spouse_id_number = spouse;
            p.marriage_date = date.clone();
            p.registration_office = office.to_owned();
            p.household_no = household.clone();
            p.address = address.clone();
        }
    }
    for i in waiting_men.into_iter().chain(waiting_women) {
        let p = &persons[i];
        let (spouse_gender, spouse_legal, own_legal) = match p.gender {
            Gender::Male => (Gender::Female, FEMALE_MARRIAGE_AGE, MALE_MARRIAGE_AGE),
            Gender::Female => (Gender::Male, MALE_MARRIAGE_AGE, FEMALE_MARRIAGE_AGE),
        };
        let own_year = birth_year(p);
        // A spouse within three years of age who was of legal age by the reference year.
        let low = own_year.saturating_sub(3).max(FIRST_BIRTH_YEAR);
        let high = (own_year + 3).min(REFERENCE_YEAR - spouse_legal);
        let spouse_year = low + rng.below(u64::from(high.saturating_sub(low) + 1)) as u32;
        let month = 1 + rng.below(12) as u32;
        let day = 1 + rng.below(u64::from(days_in_month(spouse_year, month))) as u32;
        let spouse = unique_id(rng, used, area, (spouse_year, month, day), spouse_gender);
        let since = (own_year + own_legal).max(spouse_year + spouse_legal);
        let date = random_date_between(rng, since, REFERENCE_YEAR);
        let p = &mut persons[i];
        p.spouse_id_number = spouse;
        p.marriage_date = date;
        p.registration_office = office.to_owned();
    }
}

fn birth_year(p: &Person) -> u32 {
    p.birth_date
        .get(..4)
        .and_then(|y| y.parse().ok())
        .unwrap_or(FIRST_BIRTH_YEAR)
}

/// A random real date `YYYY-MM-DD` in the years `from..=to` (just `to` when `from > to`).
fn random_date_between(rng: &mut SplitMix64, from: u32, to: u32) -> String {
    let from = from.min(to);
    let year = from + rng.below(u64::from(to - from + 1)) as u32;
    let month = 1 + rng.below(12) as u32;
    let day = 1 + rng.below(u64::from(days_in_month(year, month))) as u32;
    format!("{year:04}-{month:02}-{day:02}")
}

fn pick<'a>(rng: &mut SplitMix64, items: &[&'a str]) -> &'a str {
    items
        .get(rng.below(items.len() as u64) as usize)
        .copied()
        .unwrap_or("")
}

/// splitmix64: a small, fast, well-distributed deterministic generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (0 when `n` is 0); the modulo bias is negligible for the small `n` used here.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        match Registry::generate("350102", 1, 5_000) {
            Ok(r) => r,
            Err(e) => panic!("generate: {e}"),
        }
    }

    #[test]
    fn check_char_matches_known_numbers() {
        // Published GB 11643 examples.
        assert_eq!(id_check_char("11010519491231002"), Some('X'));
        assert_eq!(id_check_char("44052418800101001"), Some('4'));
        assert!(is_valid_id_number("11010519491231002X"));
        assert!(is_valid_id_number("440524188001010014"));
        assert!(!is_valid_id_number("110105194912310021"));
        assert!(!is_valid_id_number("11010519491231002x"));
        assert_eq!(id_check_char("1101051949123100"), None);
        assert_eq!(id_check_char("1101051949123100A"), None);
    }

    #[test]
    fn rejects_bad_dates() {
        let body = "35010219990230001"; // 30 February
        let id = format!("{body}{}", id_check_char(body).unwrap_or('?'));
        assert!(!is_valid_id_number(&id));
        let leap = "35010220000229001";
        let id = format!("{leap}{}", id_check_char(leap).unwrap_or('?'));
        assert!(is_valid_id_number(&id));
    }

    #[test]
    fn generated_ids_are_valid_and_unique() {
        let r = registry();
        assert_eq!(r.len(), 5_000);
        let mut seen = HashSet::new();
        for p in r.persons() {
            assert!(is_valid_id_number(&p.id_number), "{}", p.id_number);
            assert!(p.id_number.starts_with("350102"));
            assert!(
                seen.insert(p.id_number.clone()),
                "duplicate {}",
                p.id_number
            );
            let year: u32 = p.id_number[6..10].parse().unwrap_or(0);
            assert!((FIRST_BIRTH_YEAR..=LAST_BIRTH_YEAR).contains(&year));
            assert_eq!(p.birth_date.replace('-', ""), p.id_number[6..14]);
            let seq_last = p.id_number.as_bytes()[16] - b'0';
            assert_eq!(seq_last % 2 == 1, p.gender == Gender::Male);
            assert_eq!(p.phone.len(), 11);
            assert!(p.phone.bytes().all(|b| b.is_ascii_digit()));
            assert!(["13", "15", "18"].contains(&&p.phone[..2]));
            let name_len = p.name.chars().count();
            assert!((2..=3).contains(&name_len), "{}", p.name);
            assert!(p.address.contains("鼓楼区"));
            match p.marital_status {
                MaritalStatus::Married => {
                    assert!(is_valid_id_number(&p.spouse_id_number));
                    assert_eq!(p.marriage_date.len(), 10);
                    assert!(!p.registration_office.is_empty());
                }
                _ => assert!(p.spouse_id_number.is_empty() && p.marriage_date.is_empty()),
            }
        }
    }

    #[test]
    fn spouses_in_registry_point_at_each_other() {
        let r = registry();
        let mut couples = 0;
        for p in r.persons() {
            if let Some(s) = r.find(&p.spouse_id_number) {
                couples += 1;
                assert_eq!(s.spouse_id_number, p.id_number);
                assert_ne!(s.gender, p.gender);
                assert_eq!(s.household_no, p.household_no);
                assert_eq!(s.marriage_date, p.marriage_date);
            }
        }
        assert!(couples > 1_000, "only {couples} paired residents");
    }

    #[test]
    fn lookup_by_id_number() {
        let r = registry();
        for i in [0, 1, 2_500, 4_999] {
            let id = r.sample_id(i).unwrap_or_default().to_owned();
            let found = r.find(&id).map(|p| p.id_number.clone());
            assert_eq!(found.as_deref(), Some(id.as_str()));
            assert_eq!(r.person(i).map(|p| &p.id_number), Some(&id));
        }
        assert!(r.find("not an id").is_none());
        assert!(r.sample_id(5_000).is_none());
        assert_eq!(r.id_numbers().count(), 5_000);
    }

    #[test]
    fn lowercase_x_is_accepted() {
        let r = registry();
        if let Some(p) = r.persons().iter().find(|p| p.id_number.ends_with('X')) {
            let lower = p.id_number.to_ascii_lowercase();
            assert_eq!(r.find(&lower).map(|q| &q.id_number), Some(&p.id_number));
        }
    }

    #[test]
    fn records_are_filtered_by_field() {
        let r = registry();
        let id = r.sample_id(7).unwrap_or_default().to_owned();
        let all = r.lookup(Resource::Household, &id, &[]).unwrap_or_default();
        let mut keys: Vec<_> = all.values.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = Resource::Household.fields().to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected);

        let wanted = vec![
            "name".to_owned(),
            "phone".to_owned(),
            "spouse_id_number".to_owned(),
        ];
        let some = r
            .lookup(Resource::Household, &id, &wanted)
            .unwrap_or_default();
        assert_eq!(some.values.len(), 2);
        assert_eq!(some.values.get("name"), r.person(7).map(|p| &p.name));
        assert!(!some.values.contains_key("spouse_id_number"));

        let marriage = r.lookup(Resource::Marriage, &id, &[]).unwrap_or_default();
        assert_eq!(marriage.values.len(), Resource::Marriage.fields().len());
        assert!(marriage.values.contains_key("marital_status"));
        assert!(!marriage.values.contains_key("phone"));
    }

    #[test]
    fn generation_is_deterministic() {
        let a = registry();
        let b = registry();
        assert_eq!(a.persons(), b.persons());
        let c = Registry::generate("350102", 2, 5_000).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a.persons(), c.persons());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            Registry::generate("35010", 1, 1),
            Err(RegistryError::InvalidAreaCode(_))
        ));
        assert!(matches!(
            Registry::generate("35010a", 1, 1),
            Err(RegistryError::InvalidAreaCode(_))
        ));
        assert!(matches!(
            Registry::generate("350102", 1, MAX_PERSONS + 1),
            Err(RegistryError::TooMany(_))
        ));
        assert!(Registry::generate("350102", 1, 0).is_ok_and(|r| r.is_empty()));
    }

    #[test]
    fn resource_codes_round_trip() {
        for r in Resource::ALL {
            assert_eq!(Resource::from_local_code(r.local_code()), Some(r));
            assert_eq!(r.fields().first(), Some(&KEY_FIELD));
        }
        assert_eq!(Resource::from_local_code("births"), None);
    }
}
