//! Traefik's TCP rule language (v3): `HostSNI`, `HostSNIRegexp`, `ClientIP`
//! and `ALPN` matchers combined with `&&`, `||`, `!` and parentheses, `&&`
//! binding tighter than `||`; arguments are backtick or double-quoted
//! strings. Matcher names are accepted as written in the documentation, in
//! lower case, in upper case, or capitalised (`HostSNI`, `hostsni`,
//! `HOSTSNI`, `Hostsni`), as Traefik's parser does.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;
use weir_plugin_sdk::names;

/// A parsed rule.
#[derive(Debug, Clone)]
pub enum Rule {
    /// One matcher.
    Match(Matcher),
    /// Both sides.
    And(Box<Rule>, Box<Rule>),
    /// Either side.
    Or(Box<Rule>, Box<Rule>),
    /// The negation.
    Not(Box<Rule>),
}

/// One matcher with its argument.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// `HostSNI(`*`)`: every connection, with or without SNI.
    AnySni,
    /// `HostSNI(`name`)`, canonical.
    Sni(String),
    /// `HostSNI(`*.parent`)`: exactly one label under `parent`.
    SniWildcard(String),
    /// `HostSNIRegexp(`re`)`, unanchored, over the canonical SNI.
    SniRegexp(Regex),
    /// `ClientIP(`ip`)` or `ClientIP(`cidr`)`.
    ClientIp(IpNet),
    /// `ALPN(`proto`)`: the client offered it.
    Alpn(String),
}

/// What a rule is matched against.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// Canonical SNI, if any.
    pub sni: Option<&'a str>,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// ALPN protocols the client offered.
    pub alpn: &'a [String],
}

impl Rule {
    /// Whether the connection matches.
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        match self {
            Rule::Match(m) => m.matches(facts),
            Rule::And(a, b) => a.matches(facts) && b.matches(facts),
            Rule::Or(a, b) => a.matches(facts) || b.matches(facts),
            Rule::Not(r) => !r.matches(facts),
        }
    }

    /// Whether the rule is exactly `HostSNI(`*`)`, Traefik's catch-all.
    pub fn is_catch_all(&self) -> bool {
        matches!(self, Rule::Match(Matcher::AnySni))
    }

    /// Whether every matcher can decide without TLS (only `HostSNI(`*`)`
    /// and `ClientIP`).
    pub fn works_without_tls(&self) -> bool {
        match self {
            Rule::Match(Matcher::AnySni | Matcher::ClientIp(_)) => true,
            Rule::Match(_) => false,
            Rule::And(a, b) | Rule::Or(a, b) => a.works_without_tls() && b.works_without_tls(),
            Rule::Not(r) => r.works_without_tls(),
        }
    }
}

impl Matcher {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        match self {
            Matcher::AnySni => true,
            Matcher::Sni(name) => facts.sni == Some(name.as_str()),
            Matcher::SniWildcard(parent) => facts
                .sni
                .and_then(names::split_first_label)
                .is_some_and(|(_, rest)| rest == parent),
            Matcher::SniRegexp(re) => re.is_match(facts.sni.unwrap_or("")),
            Matcher::ClientIp(net) => facts.client_ip.is_some_and(|ip| net.contains(&ip.to_canonical())),
            Matcher::Alpn(proto) => facts.alpn.iter().any(|offered| offered == proto),
        }
    }
}

/// Parses a rule; the error says what and where.
pub fn parse(text: &str) -> Result<Rule, String> {
    let tokens = lex(text)?;
    let mut parser = Parser { tokens, pos: 0 };
    if parser.tokens.is_empty() {
        return Err("the rule is empty".into());
    }
    let rule = parser.or()?;
    match parser.tokens.get(parser.pos) {
        None => Ok(rule),
        Some((token, at)) => Err(format!("unexpected {} at byte {at}", token.describe())),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Str(String),
    Open,
    Close,
    Comma,
    And,
    Or,
    Not,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Ident(name) => format!("`{name}`"),
            Token::Str(s) => format!("string {s:?}"),
            Token::Open => "`(`".into(),
            Token::Close => "`)`".into(),
            Token::Comma => "`,`".into(),
            Token::And => "`&&`".into(),
            Token::Or => "`||`".into(),
            Token::Not => "`!`".into(),
        }
    }
}

fn lex(text: &str) -> Result<Vec<(Token, usize)>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '(' => Token::Open,
            ')' => Token::Close,
            ',' => Token::Comma,
            '!' => Token::Not,
            '&' | '|' => {
                if chars.next_if(|(_, next)| *next == c).is_none() {
                    return Err(format!("a lone `{c}` at byte {at} (write `{c}{c}`)"));
                }
                if c == '&' { Token::And } else { Token::Or }
            }
            '`' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some((_, '`')) => break,
                        Some((_, c)) => s.push(c),
                        None => return Err(format!("the string opened at byte {at} is not closed")),
                    }
                }
                Token::Str(s)
            }
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => s.push('\\'),
                            Some((_, '"')) => s.push('"'),
                            Some((_, 'n')) => s.push('\n'),
                            Some((_, 't')) => s.push('\t'),
                            Some((_, 'r')) => s.push('\r'),
                            Some((esc, other)) => {
                                return Err(format!("unknown escape `\\{other}` at byte {}", esc - 1));
                            }
                            None => return Err(format!("the string opened at byte {at} is not closed")),
                        },
                        Some((_, c)) => s.push(c),
                        None => return Err(format!("the string opened at byte {at} is not closed")),
                    }
                }
                Token::Str(s)
            }
            c if c.is_ascii_alphabetic() => {
                let mut name = String::from(c);
                while let Some((_, next)) = chars.next_if(|(_, c)| c.is_ascii_alphanumeric() || *c == '_') {
                    name.push(next);
                }
                Token::Ident(name)
            }
            other => return Err(format!("unexpected `{other}` at byte {at}")),
        };
        tokens.push((token, at));
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(t, _)| t)
    }

    fn next(&mut self) -> Result<(Token, usize), String> {
        let token = self.tokens.get(self.pos).cloned().ok_or("the rule ends too early")?;
        self.pos += 1;
        Ok(token)
    }

    fn or(&mut self) -> Result<Rule, String> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.pos += 1;
            left = Rule::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Rule, String> {
        let mut left = self.unary()?;
        while self.peek() == Some(&Token::And) {
            self.pos += 1;
            left = Rule::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Rule, String> {
        if self.peek() == Some(&Token::Not) {
            self.pos += 1;
            return Ok(Rule::Not(Box::new(self.unary()?)));
        }
        match self.next()? {
            (Token::Open, at) => {
                let inner = self.or()?;
                match self.next() {
                    Ok((Token::Close, _)) => Ok(inner),
                    _ => Err(format!("the `(` at byte {at} is not closed")),
                }
            }
            (Token::Ident(name), at) => {
                match self.next() {
                    Ok((Token::Open, _)) => {}
                    _ => return Err(format!("`{name}` at byte {at} is not followed by `(`")),
                }
                let mut args = Vec::new();
                if self.peek() == Some(&Token::Close) {
                    self.pos += 1;
                } else {
                    loop {
                        match self.next()? {
                            (Token::Str(s), _) => args.push(s),
                            (other, at) => {
                                return Err(format!(
                                    "expected a string argument, got {} at byte {at}",
                                    other.describe()
                                ));
                            }
                        }
                        match self.next()? {
                            (Token::Comma, _) => {}
                            (Token::Close, _) => break,
                            (other, at) => {
                                return Err(format!("expected `,` or `)`, got {} at byte {at}", other.describe()));
                            }
                        }
                    }
                }
                matcher(&name, args).map(Rule::Match)
            }
            (other, at) => Err(format!("unexpected {} at byte {at}", other.describe())),
        }
    }
}

/// The canonical name of a matcher written in one of the accepted cases.
fn canonical_matcher(name: &str) -> Option<&'static str> {
    ["HostSNI", "HostSNIRegexp", "ClientIP", "ALPN"]
        .into_iter()
        .find(|canonical| {
            let lower = canonical.to_ascii_lowercase();
            let mut title = lower.clone();
            title[..1].make_ascii_uppercase();
            name == *canonical || name == lower || name == canonical.to_ascii_uppercase() || name == title
        })
}

/// Builds a matcher, checking its arguments.
fn matcher(name: &str, args: Vec<String>) -> Result<Matcher, String> {
    let canonical = canonical_matcher(name).ok_or_else(|| {
        format!("unknown matcher `{name}` (TCP rules know HostSNI, HostSNIRegexp, ClientIP and ALPN)")
    })?;
    let [arg] = <[String; 1]>::try_from(args)
        .map_err(|args| format!("{canonical} takes exactly one argument, got {}", args.len()))?;
    if arg.is_empty() {
        return Err(format!("{canonical}: the argument is empty"));
    }
    if !arg.is_ascii() {
        return Err(format!(
            "{canonical}(`{arg}`): not ASCII (write international names in punycode)"
        ));
    }
    match canonical {
        "HostSNI" => host_sni(&arg),
        "HostSNIRegexp" => Regex::new(&go_braces(&arg))
            .map(Matcher::SniRegexp)
            .map_err(|e| format!("HostSNIRegexp(`{arg}`): {e}")),
        "ClientIP" => {
            let net = match arg.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => arg
                    .parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| format!("ClientIP(`{arg}`): not an IP address or CIDR range"))?,
            };
            Ok(Matcher::ClientIp(canonical_net(net)))
        }
        "ALPN" if arg == "acme-tls/1" => Err("ALPN(`acme-tls/1`): the ACME challenge protocol is not routable".into()),
        _ => Ok(Matcher::Alpn(arg)),
    }
}

/// Escapes the braces that Go's RE2 syntax (Traefik's) takes literally — a
/// `{` that does not open a `{n}`, `{n,}` or `{n,m}` repetition, and the `}`
/// that closes it — where Rust's regex would refuse them. So Traefik v2's
/// `{name:pattern}` templates compile, and match only themselves, as in
/// Traefik v3.
fn go_braces(pattern: &str) -> String {
    let bytes = pattern.as_bytes();
    let mut out = String::with_capacity(pattern.len());
    let mut in_class = false;
    let mut literal_open = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        match c {
            '\\' => {
                out.push(c);
                if let Some(next) = pattern[i + 1..].chars().next() {
                    out.push(next);
                    i += next.len_utf8();
                }
            }
            '[' if !in_class => {
                in_class = true;
                out.push(c);
            }
            ']' if in_class => {
                in_class = false;
                out.push(c);
            }
            '{' if !in_class => {
                let rest = &pattern[i + 1..];
                let repetition = rest.find('}').is_some_and(|end| {
                    let inside = &rest[..end];
                    let (min, max) = inside.split_once(',').unwrap_or((inside, "0"));
                    !min.is_empty()
                        && min.bytes().all(|b| b.is_ascii_digit())
                        && max.bytes().all(|b| b.is_ascii_digit())
                });
                if repetition {
                    out.push(c);
                } else {
                    literal_open += 1;
                    out.push_str("\\{");
                }
            }
            '}' if !in_class && literal_open > 0 => {
                literal_open -= 1;
                out.push_str("\\}");
            }
            _ => out.push_str(&pattern[i..i + c.len_utf8()]),
        }
        i += c.len_utf8();
    }
    out
}

/// IPv4-mapped IPv6 ranges become IPv4 ones, as client addresses do.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

fn host_sni(arg: &str) -> Result<Matcher, String> {
    if arg == "*" {
        return Ok(Matcher::AnySni);
    }
    let bad = |why: &str| format!("HostSNI(`{arg}`): {why}");
    let name = arg.strip_suffix('.').unwrap_or(arg);
    if let Some(parent) = name.strip_prefix("*.") {
        let parent = names::canonicalize(parent.as_bytes()).map_err(|e| bad(&e.to_string()))?;
        if !parent.contains('.') {
            return Err(bad("a wildcard needs at least two labels after `*.`"));
        }
        return Ok(Matcher::SniWildcard(parent));
    }
    // Traefik accepts an IP address as a name, but it can never match:
    // clients send no server name for an address (RFC 6066), and weir
    // refuses a hello that carries one.
    let unbracketed = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    if unbracketed.parse::<std::net::IpAddr>().is_ok() {
        return Err(bad(
            "an IP address is never a server name (clients send none for an address, and weir refuses \
             hellos that carry one), so this rule could never match: match the client with ClientIP, or \
             name the host",
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
    {
        return Err(bad("not a valid host name"));
    }
    match names::canonicalize(name.as_bytes()) {
        Ok(canonical) => Ok(Matcher::Sni(canonical)),
        Err(e) => Err(bad(&e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(sni: Option<&'a str>, ip: &str, alpn: &'a [String]) -> Facts<'a> {
        Facts {
            sni,
            client_ip: ip.parse().ok(),
            alpn,
        }
    }

    /// (rule, sni, client ip, expected match)
    #[test]
    fn matchers_and_operators_as_a_table() {
        let none: &[String] = &[];
        let cases: &[(&str, Option<&str>, &str, bool)] = &[
            ("HostSNI(`foobar`)", Some("foobar"), "10.0.0.1", true),
            ("HostSNI(`foobar`)", Some("bar"), "10.0.0.1", false),
            ("HostSNI(`Example.COM`)", Some("example.com"), "10.0.0.1", true),
            ("HostSNI(`example.com.`)", Some("example.com"), "10.0.0.1", true),
            ("HostSNI(`foo.example.com`)", Some("foo.example.com"), "10.0.0.1", true),
            ("HostSNI(`example.com`)", None, "10.0.0.1", false),
            ("HostSNI(`*`)", Some("example.com"), "10.0.0.1", true),
            ("HostSNI(`*`)", None, "10.0.0.1", true),
            ("HostSNI(`*.example.com`)", Some("a.example.com"), "10.0.0.1", true),
            ("HostSNI(`*.example.com`)", Some("a.b.example.com"), "10.0.0.1", false),
            ("HostSNI(`*.example.com`)", Some("example.com"), "10.0.0.1", false),
            ("hostsni(`foobar`)", Some("foobar"), "10.0.0.1", true),
            ("HOSTSNI(`foobar`)", Some("foobar"), "10.0.0.1", true),
            ("Hostsni(`foobar`)", Some("foobar"), "10.0.0.1", true),
            ("HostSNI(\"foobar\")", Some("foobar"), "10.0.0.1", true),
            ("!HostSNI(`bar`)", Some("foobar"), "10.0.0.1", true),
            ("!HostSNI(`bar`)", Some("bar"), "10.0.0.1", false),
            (
                "HostSNIRegexp(`^example\\.(com|org)$`)",
                Some("example.com"),
                "10.0.0.1",
                true,
            ),
            (
                "HostSNIRegexp(`^example\\.(com|org)$`)",
                Some("example.org"),
                "10.0.0.1",
                true,
            ),
            (
                "HostSNIRegexp(`^example\\.(com|org)$`)",
                Some("exampleuorg"),
                "10.0.0.1",
                false,
            ),
            ("HostSNIRegexp(`^example\\.(com|org)$`)", None, "10.0.0.1", false),
            ("HostSNIRegexp(`example`)", Some("www.example.net"), "10.0.0.1", true),
            (
                "HostSNIRegexp(`example.{tld:(com|org)}`)",
                Some("example.com"),
                "10.0.0.1",
                false,
            ),
            ("HostSNIRegexp(\"^a\\\\.b$\")", Some("a.b"), "10.0.0.1", true),
            ("HostSNIRegexp(`^x{2}\\.b$`)", Some("xx.b"), "10.0.0.1", true),
            ("HostSNIRegexp(`^x{2,}\\.b$`)", Some("x.b"), "10.0.0.1", false),
            ("HostSNIRegexp(`^[{]a}$`)", Some("{a}"), "10.0.0.1", true),
            ("hostsniregexp(`foobar`)", Some("foobar"), "10.0.0.1", true),
            ("ClientIP(`10.0.0.1`)", None, "10.0.0.1", true),
            ("ClientIP(`10.0.0.1`)", None, "10.0.0.2", false),
            ("ClientIP(`20.20.20.20/24`)", None, "20.20.20.40", true),
            ("ClientIP(`20.20.20.20/24`)", None, "10.10.10.10", false),
            ("ClientIP(`10::10`)", None, "10::10", true),
            ("ClientIP(`10::10`)", None, "::1", false),
            ("ClientIP(`11::/16`)", None, "11::", true),
            ("ClientIP(`11::/16`)", None, "10::", false),
            ("ClientIP(`10.0.0.0/8`)", None, "::ffff:10.1.2.3", true),
            ("clientip(`10.0.0.1`)", None, "10.0.0.1", true),
            ("!ClientIP(`20.0.0.1`)", None, "10.0.0.1", true),
            (
                "HostSNI(`foobar`) && ClientIP(`10.0.0.1`)",
                Some("foobar"),
                "10.0.0.1",
                true,
            ),
            (
                "HostSNI(`foobar`) && ClientIP(`10.0.0.1`)",
                Some("foobar"),
                "10.0.0.2",
                false,
            ),
            (
                "HostSNI(`foobar`) || ClientIP(`10.0.0.1`)",
                Some("bar"),
                "10.0.0.1",
                true,
            ),
            (
                "HostSNI(`foobar`) || ClientIP(`10.0.0.1`)",
                Some("bar"),
                "10.0.0.2",
                false,
            ),
            // && binds tighter than ||.
            (
                "HostSNI(`foobar`) || HostSNI(`bar`) && ClientIP(`10.0.0.1`)",
                Some("foobar"),
                "10.0.0.2",
                true,
            ),
            (
                "HostSNI(`foobar`) || HostSNI(`bar`) && ClientIP(`10.0.0.1`)",
                Some("bar"),
                "10.0.0.2",
                false,
            ),
            (
                "(HostSNI(`foobar`) || HostSNI(`bar`)) && ClientIP(`10.0.0.1`)",
                Some("foobar"),
                "10.0.0.2",
                false,
            ),
            (
                "!(HostSNI(`bar`) && ClientIP(`10.0.0.2`))",
                Some("bar"),
                "10.0.0.1",
                true,
            ),
            (
                "!(HostSNI(`bar`) && ClientIP(`10.0.0.2`))",
                Some("bar"),
                "10.0.0.2",
                false,
            ),
            (
                "!(HostSNI(`bar`) || ClientIP(`10.0.0.2`))",
                Some("foobar"),
                "10.0.0.1",
                true,
            ),
            ("!!HostSNI(`bar`)", Some("bar"), "10.0.0.1", true),
            (
                "(HostSNI(`foobar`) || (HostSNI(`bar`) && !HostSNI(`foobar`))) && ((ClientIP(`10.0.0.1`) && !ClientIP(`10.0.0.2`)) || ClientIP(`10.0.0.2`)) ",
                Some("bar"),
                "10.0.0.1",
                true,
            ),
        ];
        for (rule, sni, ip, expected) in cases {
            let parsed = parse(rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
            assert_eq!(
                parsed.matches(&facts(*sni, ip, none)),
                *expected,
                "{rule} with {sni:?} from {ip}"
            );
        }
    }

    #[test]
    fn alpn_matches_an_offered_protocol() {
        let rule = parse("ALPN(`h2`)").expect("valid");
        let offered = ["http/1.1".to_owned(), "h2".to_owned()];
        assert!(rule.matches(&facts(Some("a"), "10.0.0.1", &offered)));
        assert!(!rule.matches(&facts(Some("a"), "10.0.0.1", &offered[..1])));
        assert!(!rule.matches(&facts(Some("a"), "10.0.0.1", &[])));
    }

    #[test]
    fn build_errors_say_why() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("rulewithnomatcher", "not followed by `(`"),
            ("HostSNI()", "exactly one argument, got 0"),
            ("HostSNI(``)", "the argument is empty"),
            ("HostSNI(`example.com`, `example.org`)", "exactly one argument, got 2"),
            ("HostSNI(`*.com`)", "at least two labels"),
            ("HostSNI(`🦭.com`)", "not ASCII"),
            ("HostSNI(`a/b`)", "not a valid host name"),
            ("HostSNIRegexp(``)", "empty"),
            ("HostSNIRegexp(`(example.com`)", "HostSNIRegexp(`(example.com`)"),
            ("HostSNIRegexp(`a`, `b`)", "exactly one argument"),
            ("ClientIP(`invalid`)", "not an IP address or CIDR"),
            ("ClientIP(`127.0.0.1`, `127.0.0.2`)", "exactly one argument"),
            ("ALPN(`acme-tls/1`)", "not routable"),
            ("ALPN(``)", "empty"),
            ("Host(`example.com`)", "unknown matcher `Host`"),
            ("hOstSNI(`a`)", "unknown matcher"),
            ("HostSNI(`a`) &&", "ends too early"),
            ("HostSNI(`a`) ||", "ends too early"),
            ("HostSNI(`a)", "not closed"),
            ("HostSNI(`a`))", "unexpected `)`"),
            ("(HostSNI(`a`)", "not closed"),
            ("HostSNI(`a`) & ClientIP(`1.2.3.4`)", "lone `&`"),
            ("HostSNI(`a`) HostSNI(`b`)", "unexpected `HostSNI`"),
            ("HostSNI(\"a\\.b\")", "unknown escape"),
            ("HostSNI(a)", "expected a string argument"),
            ("HostSNI(`127.0.0.1`)", "an IP address is never a server name"),
            ("HostSNI(`[::1]`)", "an IP address is never a server name"),
            ("HostSNI(`2001:db8::1`)", "an IP address is never a server name"),
        ];
        for (rule, expected) in cases {
            let err = parse(rule).expect_err(rule);
            assert!(err.contains(expected), "{rule}: {err}");
        }
    }

    #[test]
    fn catch_all_and_tls_needs_are_recognised() {
        assert!(parse("HostSNI(`*`)").expect("valid").is_catch_all());
        assert!(!parse("HostSNIRegexp(`.*`)").expect("valid").is_catch_all());
        assert!(
            !parse("HostSNI(`*`) && ClientIP(`10.0.0.0/8`)")
                .expect("valid")
                .is_catch_all()
        );
        assert!(
            parse("HostSNI(`*`) && !ClientIP(`10.0.0.0/8`)")
                .expect("valid")
                .works_without_tls()
        );
        assert!(
            !parse("HostSNI(`a.b`) || ClientIP(`10.0.0.0/8`)")
                .expect("valid")
                .works_without_tls()
        );
        assert!(!parse("ALPN(`h2`)").expect("valid").works_without_tls());
    }
}
