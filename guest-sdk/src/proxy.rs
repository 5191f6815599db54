//! The PROXY protocol rule host and plugins share: the versions a target may
//! ask for. One definition, so a route a plugin accepts is never one the host
//! refuses.

/// The PROXY protocol versions that exist (v1 text, v2 binary).
pub const VERSIONS: [u8; 2] = [1, 2];

/// `version` when it is a PROXY protocol version, else why not.
pub fn check_version(version: u8) -> Result<u8, String> {
    match VERSIONS.contains(&version) {
        true => Ok(version),
        false => Err(format!(
            "PROXY protocol version {version} does not exist (only 1 and 2)"
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_one_and_two() {
        assert_eq!(super::check_version(1), Ok(1));
        assert_eq!(super::check_version(2), Ok(2));
        for v in [0, 3, 255] {
            assert!(
                super::check_version(v)
                    .expect_err("not a version")
                    .contains("only 1 and 2")
            );
        }
    }
}
