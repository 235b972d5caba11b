//! The daemon's configuration file (TOML): which members share which regions.
//!
//! ```toml
//! socket_dir = "/run/ivcom/vm"   # optional
//! [[group]]                      # one region shared by all members
//! name = "lab"
//! members = ["vm1", "vm2", "host"]
//! size = "16M"
//! vectors = 1                    # optional, 1..=64
//! plain = false                  # optional: a /dev/shm file for ivshmem-plain instead
//! [[pairs]]                      # one region per unordered pair of members
//! name = "mesh"
//! members = ["a", "b", "c"]      # regions mesh.a.b, mesh.a.c, mesh.b.c
//! size = "4M"
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Smallest region.
pub const MIN_SIZE: u64 = 1 << 20;
/// Largest region.
pub const MAX_SIZE: u64 = 1 << 30;
/// Most vectors per member.
pub const MAX_VECTORS: u16 = 64;

/// A configuration that cannot be used; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML, or fields of the wrong type, or unknown fields.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's description, with the line.
        message: String,
    },
    /// Valid TOML that breaks a rule.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the table and field.
        problem: String,
    },
}

/// How a region came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionKind {
    /// A `[[group]]`: one region for all its members.
    Group,
    /// One region of a `[[pairs]]` set (the set's name).
    Pair {
        /// Name of the `[[pairs]]` table.
        set: String,
    },
}

/// One shared-memory region and who may attach to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// Region name (`lab`, or `mesh.a.b` for a pair).
    pub name: String,
    /// Members in peer-id order: member `i` gets peer id `i`.
    pub members: Vec<String>,
    /// Size in bytes: a power of two in 1 MiB..=1 GiB.
    pub size: u64,
    /// Interrupt vectors per member, 1..=64 (1 for plain regions, which have none).
    pub vectors: u16,
    /// Served as a `/dev/shm` file for ivshmem-plain rather than through doorbell sockets.
    pub plain: bool,
    /// Ring capacity per direction of each channel in the region (a power of two, 16 KiB to
    /// 1/8 of the region); `None`: chosen from the size and the member count.
    pub ring: Option<u64>,
    /// Where it comes from.
    pub kind: RegionKind,
}

impl RegionConfig {
    /// The peer id of `member` in this region.
    pub fn peer_id(&self, member: &str) -> Option<u16> {
        self.members.iter().position(|m| m == member).and_then(|i| u16::try_from(i).ok())
    }

    /// The name of the region's file under the shm directory, for plain regions.
    pub fn shm_file_name(&self) -> String {
        format!("ivcom.{}", self.name)
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages).
    pub path: PathBuf,
    /// `socket_dir` from the file, if set.
    pub socket_dir: Option<PathBuf>,
    /// All regions, groups first then pairs, each in file order.
    pub regions: Vec<RegionConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket_dir: Option<PathBuf>,
    #[serde(default)]
    group: Vec<RawSet>,
    #[serde(default)]
    pairs: Vec<RawSet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSet {
    name: String,
    members: Vec<String>,
    size: RawSize,
    vectors: Option<i64>,
    plain: Option<bool>,
    ring: Option<RawSize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Number(i64),
    Text(String),
}

/// Checks a region, pair-set or member name: 1-64 of `A-Z a-z 0-9 . _ -`, not `.` or `..`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("name {name:?} must be 1 to 64 characters long"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("name {name:?} has the character {c:?}; allowed are A-Z a-z 0-9 . _ -"));
    }
    if name == "." || name == ".." {
        return Err(format!("name {name:?} is not allowed (it is a path component)"));
    }
    Ok(())
}

/// Parses a size: a number of bytes, or a number with a `K`, `M` or `G` suffix (binary).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("size {text:?} is not a number of bytes or a number with K, M or G"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {text:?} is too large"))
}

fn check_size(bytes: u64, shown: &str) -> Result<u64, String> {
    if !bytes.is_power_of_two() || !(MIN_SIZE..=MAX_SIZE).contains(&bytes) {
        return Err(format!("size {shown} must be a power of two from 1M to 1G"));
    }
    Ok(bytes)
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Validates configuration `text`; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |problem: String| ConfigError::Invalid { path: path.to_owned(), problem };
        let mut regions = Vec::new();
        let mut seen_sets = HashSet::new();
        for (table, sets) in [("group", &raw.group), ("pairs", &raw.pairs)] {
            for set in sets {
                let at = format!("[[{table}]] {:?}", set.name);
                check_name(&set.name).map_err(|p| invalid(format!("[[{table}]]: {p}")))?;
                if !seen_sets.insert(set.name.clone()) {
                    return Err(invalid(format!(
                        "{at}: duplicate name {:?} (group and pairs names must be unique)",
                        set.name
                    )));
                }
                let min = if table == "pairs" { 2 } else { 1 };
                if set.members.len() < min {
                    return Err(invalid(format!("{at}: needs at least {min} member(s)")));
                }
                if set.members.len() > usize::from(u16::MAX) + 1 {
                    return Err(invalid(format!("{at}: more than 65536 members")));
                }
                let mut seen = HashSet::new();
                for m in &set.members {
                    check_name(m).map_err(|p| invalid(format!("{at}: member {p}")))?;
                    if !seen.insert(m.as_str()) {
                        return Err(invalid(format!("{at}: duplicate member {m:?}")));
                    }
                }
                let size = match &set.size {
                    RawSize::Number(n) => {
                        let n =
                            u64::try_from(*n).map_err(|_| invalid(format!("{at}: size {n} is negative")))?;
                        check_size(n, &n.to_string())
                    }
                    RawSize::Text(t) => parse_size(t).and_then(|n| check_size(n, &format!("{t:?}"))),
                }
                .map_err(|p| invalid(format!("{at}: {p}")))?;
                let plain = set.plain.unwrap_or(false);
                let vectors = match set.vectors {
                    None => 1,
                    Some(_) if plain => {
                        return Err(invalid(format!(
                            "{at}: vectors has no meaning for a plain region (no doorbells)"
                        )))
                    }
                    Some(v) if (1..=i64::from(MAX_VECTORS)).contains(&v) => v as u16,
                    Some(v) => {
                        return Err(invalid(format!("{at}: vectors = {v}; must be 1 to {MAX_VECTORS}")))
                    }
                };
                let ring = match &set.ring {
                    None => None,
                    Some(raw) => {
                        let (n, shown) = match raw {
                            RawSize::Number(n) => (u64::try_from(*n).ok(), n.to_string()),
                            RawSize::Text(t) => (parse_size(t).ok(), format!("{t:?}")),
                        };
                        match n {
                            Some(n) if n.is_power_of_two() && (16 << 10..=size / 8).contains(&n) => Some(n),
                            _ => {
                                return Err(invalid(format!(
                                    "{at}: ring {shown} must be a power of two from 16K to 1/8 of the size"
                                )))
                            }
                        }
                    }
                };
                let mk = |name: String, members: Vec<String>, kind| RegionConfig {
                    name,
                    members,
                    size,
                    vectors,
                    plain,
                    ring,
                    kind,
                };
                if table == "group" {
                    regions.push(mk(set.name.clone(), set.members.clone(), RegionKind::Group));
                } else {
                    for (i, a) in set.members.iter().enumerate() {
                        for b in &set.members[i + 1..] {
                            regions.push(mk(
                                format!("{}.{a}.{b}", set.name),
                                vec![a.clone(), b.clone()],
                                RegionKind::Pair { set: set.name.clone() },
                            ));
                        }
                    }
                }
            }
        }
        let mut names = HashSet::new();
        for r in &regions {
            if !names.insert(r.name.as_str()) {
                return Err(invalid(format!(
                    "duplicate region name {:?} (from a group or a pair of members)",
                    r.name
                )));
            }
        }
        if let Some(d) = &raw.socket_dir {
            if !d.is_absolute() {
                return Err(invalid(format!(
                    "socket_dir {:?} must be an absolute path",
                    d.display().to_string()
                )));
            }
        }
        Ok(Config { path: path.to_owned(), socket_dir: raw.socket_dir, regions })
    }

    /// The region called `name`.
    pub fn region(&self, name: &str) -> Option<&RegionConfig> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The socket directory: `over` if given, else the file's `socket_dir`, else
    /// [`default_socket_dir`].
    pub fn socket_dir(&self, over: Option<&Path>) -> PathBuf {
        over.map(Path::to_owned).or_else(|| self.socket_dir.clone()).unwrap_or_else(default_socket_dir)
    }
}

/// `$IVCOM_RUNTIME_DIR/vm`, else `$XDG_RUNTIME_DIR/ivcom/vm`, else `/run/ivcom/vm` for root,
/// else `<temp dir>/ivcom-UID/vm` (the `vm` directory of ivcom's runtime directory).
pub fn default_socket_dir() -> PathBuf {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = env("IVCOM_RUNTIME_DIR") {
        d.join("vm")
    } else if let Some(d) = env("XDG_RUNTIME_DIR") {
        d.join("ivcom").join("vm")
    } else {
        let uid = rustix::process::geteuid().as_raw();
        if uid == 0 {
            PathBuf::from("/run/ivcom/vm")
        } else {
            std::env::temp_dir().join(format!("ivcom-{uid}")).join("vm")
        }
    }
}

/// The socket a member of a region connects to: `<socket_dir>/<region>/<member>.sock`.
pub fn socket_path(socket_dir: &Path, region: &str, member: &str) -> PathBuf {
    socket_dir.join(region).join(format!("{member}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1024K"), Ok(1 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("16MB").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(check_size(3 << 20, "3M").is_err());
        assert!(check_size(2 << 30, "2G").is_err());
        assert!(check_size(512 << 10, "512K").is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("vm-1.a_b").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pairs_expand_in_order() {
        let c = Config::parse(
            "[[group]]\nname='lab'\nmembers=['x','y']\nsize='1M'\n[[pairs]]\nname='mesh'\nmembers=['a','b','c']\nsize=4194304\nvectors=3\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let names: Vec<_> = c.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["lab", "mesh.a.b", "mesh.a.c", "mesh.b.c"]);
        let r = c.region("mesh.a.c").unwrap();
        assert_eq!((r.size, r.vectors, r.peer_id("c")), (4 << 20, 3, Some(1)));
        assert_eq!(c.region("lab").unwrap().vectors, 1);
    }
}
