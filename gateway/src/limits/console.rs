//! The limits of the operator's console-account messages.

use fedgate_proto::v1::{AddUserRequest, DisableUserRequest, ListUsersRequest, ResetUserRequest};

use super::{Bounded, LimitsConfig, ident, limit, text};
use crate::error::Result;

impl Bounded for AddUserRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("login", &self.login, limit!(l, max_id_chars))?;
        text("name", &self.name, limit!(l, max_title_chars))?;
        ident("agency_uscc", &self.agency_uscc, limit!(l, max_id_chars))
    }
}

impl Bounded for DisableUserRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("login", &self.login, limit!(l, max_id_chars))
    }
}

impl Bounded for ResetUserRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("login", &self.login, limit!(l, max_id_chars))
    }
}

impl Bounded for ListUsersRequest {
    fn check_limits(&self, _: &LimitsConfig) -> Result<()> {
        Ok(())
    }
}
