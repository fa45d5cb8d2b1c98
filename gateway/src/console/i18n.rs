//! The console's two languages: Chinese by default, English on the user's choice (a cookie).

/// A language the console speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    /// 简体中文, the default.
    #[default]
    Zh,
    /// English.
    En,
}

/// Every text of the console: key, Chinese, English.
const TEXTS: &[(&str, &str, &str)] = &[
    ("title", "政务数据共享交换控制台", "Data exchange console"),
    ("node", "节点", "Node"),
    ("sign_in", "登录", "Sign in"),
    ("sign_out", "退出", "Sign out"),
    ("login", "身份证号或工号", "ID or staff number"),
    ("password", "密码", "Password"),
    ("code", "动态验证码", "Authenticator code"),
    (
        "code_hint",
        "未启用双因素认证时留空",
        "Leave empty when the account has no second factor",
    ),
    ("bad_sign_in", "账号或密码错误", "Wrong login or password"),
    (
        "locked",
        "连续失败次数过多，账号已锁定，请稍后再试",
        "Too many failures: the account is locked for a while",
    ),
    ("disabled", "账号已停用", "The account is disabled"),
    ("bad_code", "动态验证码错误", "Wrong authenticator code"),
    ("language", "English", "中文"),
    ("federation", "联邦拓扑", "Federation"),
    ("catalog", "资源目录", "Catalog"),
    ("reports", "逾期与过期", "Overdue and stale"),
    ("statistics", "统计分析", "Statistics"),
    ("audit", "审计查询", "Audit"),
    ("review", "待审申请", "Applications"),
    ("grants", "授权", "Grants"),
    ("objections", "异议", "Objections"),
    ("account", "账号", "Account"),
    ("role_operator", "运维人员", "operator"),
    ("role_auditor", "审计人员", "auditor"),
    ("role_reviewer", "审核人员", "reviewer"),
    ("acting_for", "代表单位", "acting for"),
    ("parent", "上级节点", "Parent"),
    ("children", "下级节点", "Children"),
    ("link", "链路", "Link"),
    ("connected", "已连接", "connected"),
    ("disconnected", "未连接", "not connected"),
    ("lag", "转发积压", "Forwarding lag"),
    ("stream", "数据流", "Stream"),
    ("acked", "已确认", "Acknowledged"),
    ("head", "已写入", "Written"),
    ("received", "已接收", "Received"),
    ("chains", "审计链", "Audit chains"),
    ("records", "记录数", "Records"),
    ("last_record", "最新记录", "Latest record"),
    ("search", "检索", "Search"),
    ("text", "关键词", "Words"),
    ("provider", "提供单位", "Provider"),
    ("consumer", "使用单位", "Consumer"),
    ("share_type", "共享类型", "Share type"),
    ("classification", "分类", "Classification"),
    ("resource", "资源", "Resource"),
    ("fields", "字段", "Fields"),
    ("field", "字段", "Field"),
    ("masking", "脱敏", "Masking"),
    ("no_masking", "不脱敏", "none"),
    ("holders", "持有授权的单位", "Grants held"),
    ("expires", "到期", "Expires"),
    ("days_left", "剩余工作日", "Working days left"),
    ("overdue", "已逾期", "overdue"),
    ("state", "状态", "State"),
    ("filed", "提交时间", "Filed"),
    ("purpose", "用途", "Purpose"),
    ("mode", "方式", "Mode"),
    ("approve", "批准", "Approve"),
    ("reject", "驳回", "Reject"),
    ("reason", "理由", "Reason"),
    ("expiry", "有效期至", "Valid until"),
    ("keep", "保持申请内容", "as asked"),
    ("revoke", "撤销", "Revoke"),
    ("resolve", "处理", "Resolve"),
    ("corrected", "已更正", "Corrected"),
    ("confirmed", "确认无误", "Confirmed correct"),
    ("resolution", "处理意见", "Resolution"),
    ("nothing", "暂无", "Nothing here"),
    (
        "overdue_applications",
        "逾期未审申请",
        "Overdue applications",
    ),
    ("overdue_objections", "逾期未处理异议", "Overdue objections"),
    ("overdue_demands", "逾期需求", "Overdue demands"),
    ("stale_entries", "超期未更新目录", "Stale catalog entries"),
    ("agency", "单位", "Agency"),
    ("from", "起", "From"),
    ("to", "止", "To"),
    ("outcome", "结果", "Outcome"),
    ("operation", "操作", "Operation"),
    ("actor", "操作者", "Actor"),
    ("time", "时间", "Time"),
    ("route", "路径", "Route"),
    ("request", "请求", "Request"),
    ("verify", "校验审计链", "Verify the chains"),
    ("verified", "校验通过", "verified"),
    ("broken", "校验失败", "BROKEN"),
    ("shares_per_day", "每日共享次数", "Shares per day"),
    ("by_resource", "按资源", "By resource"),
    ("by_consumer", "按使用单位", "By consumer"),
    ("by_outcome", "按结果", "By outcome"),
    (
        "approval_times",
        "审批用时（工作日）与时限",
        "Approval time (working days) against the deadline",
    ),
    ("deadline", "时限", "Deadline"),
    ("change_password", "修改密码", "Change password"),
    ("current_password", "当前密码", "Current password"),
    (
        "new_password",
        "新密码（至少12位）",
        "New password (12 characters or more)",
    ),
    ("saved", "已保存", "Saved"),
    ("decided", "已决定", "Decided"),
    ("detail", "说明", "Detail"),
    ("next_page", "下一页", "Next page"),
    ("error", "出错了", "Something went wrong"),
    ("back", "返回", "Back"),
    ("signed_in_as", "当前用户", "Signed in as"),
    ("total", "合计", "Total"),
    ("days", "天", "days"),
];

impl Lang {
    /// The language a cookie value names; Chinese for anything else.
    pub fn from_cookie(value: Option<&str>) -> Self {
        match value {
            Some("en") => Lang::En,
            _ => Lang::Zh,
        }
    }

    /// The cookie value and `lang` attribute of this language.
    pub fn code(self) -> &'static str {
        match self {
            Lang::Zh => "zh",
            Lang::En => "en",
        }
    }

    /// The other language: what the switch in the header offers.
    pub fn other(self) -> Self {
        match self {
            Lang::Zh => Lang::En,
            Lang::En => Lang::Zh,
        }
    }

    /// The text under `key` in this language (the key itself if there is none, which a test rules out).
    pub fn tr(&self, key: &str) -> &'static str {
        match TEXTS.iter().find(|(k, _, _)| *k == key) {
            Some((_, zh, en)) => match self {
                Lang::Zh => zh,
                Lang::En => en,
            },
            None => "?",
        }
    }
}

/// Whether `key` has a text.
pub fn known(key: &str) -> bool {
    TEXTS.iter().any(|(k, _, _)| *k == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.tr("…")` in the templates and the console's code has a text in both languages.
    #[test]
    fn every_key_used_has_a_text() {
        let dirs = [
            concat!(env!("CARGO_MANIFEST_DIR"), "/templates/console"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/src/console"),
        ];
        let mut missing = Vec::new();
        for dir in dirs {
            for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                for part in text.split(".tr(\"").skip(1) {
                    let key = part.split('"').next().unwrap_or_default();
                    if !known(key) && key != "…" {
                        missing.push(format!("{}: {key}", f.path().display()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "keys without text: {missing:?}");
    }

    #[test]
    fn keys_are_unique() {
        for (i, (k, _, _)) in TEXTS.iter().enumerate() {
            assert!(
                !TEXTS[..i].iter().any(|(o, _, _)| o == k),
                "{k} is listed twice"
            );
        }
    }
}
