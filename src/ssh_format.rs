//! OpenSSH certificate fields as the `ssh` backend and its policies use them, as pure functions:
//! principals, critical options and extensions (PROTOCOL.certkeys).

/// The extensions a grant may give. Certificates carry none by default (OpenSSH's `ssh-keygen`
/// grants all the `permit-*` ones unless told not to; a job's certificate should not forward an
/// agent or ports, or run `~/.ssh/rc`, unless its policy says so).
pub const EXTENSIONS: [&str; 6] = [
    "no-touch-required",
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
];

/// A principal (a user name on the servers): letters, digits, `.`, `_`, `-`, `@`, 1 to 128.
/// Attack: a comma or a space would read as a list (`AuthorizedPrincipalsFile`, `ssh-keygen -n`),
/// a control character as the end of a line.
pub fn is_principal(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// `force-command`: printable text without control characters, at most 1,024 bytes.
pub fn check_force_command(command: &str) -> Result<(), String> {
    if command.is_empty() || command.len() > 1024 || command.chars().any(char::is_control) {
        return Err("must be 1 to 1,024 printable characters".into());
    }
    Ok(())
}

/// `source-address`: comma-separated CIDR blocks or addresses, as `sshd` reads them.
pub fn check_source_address(list: &str) -> Result<(), String> {
    let ok = !list.is_empty()
        && list.split(',').all(|entry| {
            let (addr, bits) = entry.split_once('/').map_or((entry, None), |(a, b)| (a, Some(b)));
            let Ok(ip) = addr.parse::<std::net::IpAddr>() else { return false };
            let max = if ip.is_ipv4() { 32 } else { 128 };
            bits.is_none_or(|b| b.parse::<u8>().is_ok_and(|b| b <= max))
        });
    if ok { Ok(()) } else { Err("must be comma-separated addresses or CIDR blocks, e.g. 10.0.0.0/8,192.0.2.7".into()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_options_and_addresses_that_could_say_more_are_refused() {
        assert!(is_principal("deploy") && is_principal("octo-org.deploy@prod"));
        for bad in ["", "a,b", "a b", "a\nb", "*", &"x".repeat(129)] {
            assert!(!is_principal(bad), "{bad:?}");
        }
        assert!(check_force_command("/usr/local/bin/deploy --env prod").is_ok());
        assert!(check_force_command("a\nb").is_err() && check_force_command("").is_err());
        assert!(check_source_address("10.0.0.0/8,192.0.2.7,::1/128").is_ok());
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0.0/8,", "*"] {
            assert!(check_source_address(bad).is_err(), "{bad:?}");
        }
    }
}
