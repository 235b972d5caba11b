//! The daemon's configuration file (TOML): which members share which regions.
//!
//! ```toml
//! socket_dir = "/run/ivcom-vm"   # optional
//! socket_group = 990             # optional: socket directories 0750 with this group, else 0700
//! [members.vm1]                  # optional: who may connect as vm1 (checked with SO_PEERCRED)
//! uid = 1001                     # and/or gid = ...
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
//!
//! Sizes are bounded before anything is expanded: the file ([`MAX_CONFIG_BYTES`]), members
//! per group ([`MAX_GROUP_MEMBERS`]) and per pair set ([`MAX_PAIR_MEMBERS`]), regions in all
//! ([`MAX_REGIONS`]) and their total memory ([`MAX_TOTAL_SIZE`]).

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Smallest region.
pub const MIN_SIZE: u64 = 1 << 20;
/// Largest region.
pub const MAX_SIZE: u64 = 1 << 30;
/// Most vectors per member.
pub const MAX_VECTORS: u16 = 64;
/// Largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most members of one `[[group]]` (each gets a socket and its own peer ids).
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// Most members of one `[[pairs]]` set: 64 members make 2016 regions.
pub const MAX_PAIR_MEMBERS: usize = 64;
/// Most regions in all (groups plus every pair).
pub const MAX_REGIONS: usize = 4096;
/// Most memory of all regions together (each is a memfd or file the daemon maps).
pub const MAX_TOTAL_SIZE: u64 = 64 << 30;
/// Most `[members.NAME]` bindings.
pub const MAX_BINDINGS: usize = 4096;

/// Who may connect as a member: the connecting process's credentials (`SO_PEERCRED`) must
/// have this uid and/or this effective gid. Root is always admitted (it can take any
/// process's place anyway). A member without a binding admits the daemon's own uid only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Required uid, if any.
    pub uid: Option<u32>,
    /// Required effective gid, if any.
    pub gid: Option<u32>,
}

impl Binding {
    /// Whether a process with `uid`/`gid` may connect as a member bound by `binding` (`None`:
    /// unbound) to a daemon running as `daemon_uid`.
    pub fn allows(binding: Option<&Binding>, daemon_uid: u32, uid: u32, gid: u32) -> bool {
        if uid == 0 {
            return true;
        }
        match binding {
            None => uid == daemon_uid,
            Some(b) => b.uid.is_none_or(|u| u == uid) && b.gid.is_none_or(|g| g == gid),
        }
    }

    /// Owner, group and mode for the member's socket file: owned by the bound uid, mode 0600;
    /// bound to a gid only: the daemon's, group gid, 0660; unbound: the daemon's, 0600.
    pub fn socket_owner(binding: Option<&Binding>) -> (Option<u32>, Option<u32>, u32) {
        match binding {
            Some(Binding { uid: Some(u), gid }) => (Some(*u), *gid, 0o600),
            Some(Binding { uid: None, gid: Some(g) }) => (None, Some(*g), 0o660),
            _ => (None, None, 0o600),
        }
    }
}

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
    /// Per member (same order as `members`): who may connect as it (`[members.NAME]`).
    pub bindings: Vec<Option<Binding>>,
    /// Plain regions: the group given read-write access to the file (mode 0660); `None`:
    /// mode 0600, the daemon's user only.
    pub shm_group: Option<u32>,
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
    /// `socket_group`: the socket directories are 0750 with this group (else 0700).
    pub socket_group: Option<u32>,
    /// All regions, groups first then pairs, each in file order.
    pub regions: Vec<RegionConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket_dir: Option<PathBuf>,
    socket_group: Option<u32>,
    #[serde(default)]
    members: BTreeMap<String, RawBinding>,
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
    shm_group: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    uid: Option<u32>,
    gid: Option<u32>,
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
    /// Reads and validates `path`. A file larger than [`MAX_CONFIG_BYTES`] is an error
    /// before it is read (or, for files whose size is not known in advance, once that much
    /// has been read).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(read)?;
        let too_big = || ConfigError::Invalid {
            path: path.to_owned(),
            problem: format!("the file is larger than {MAX_CONFIG_BYTES} bytes"),
        };
        if file.metadata().map_err(read)?.len() > MAX_CONFIG_BYTES {
            return Err(too_big());
        }
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(read)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(too_big());
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8: {e}")))
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration `text`; `path` is used in messages. Every bound of this
    /// module is checked before pairs are expanded.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                problem: format!("the configuration is larger than {MAX_CONFIG_BYTES} bytes"),
            });
        }
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |problem: String| ConfigError::Invalid { path: path.to_owned(), problem };
        // Bounds first, before anything is expanded: a short file can name n members whose
        // pairs make n(n-1)/2 regions.
        let mut region_count: usize = 0;
        let mut total_size: u64 = 0;
        for (table, sets) in [("group", &raw.group), ("pairs", &raw.pairs)] {
            for set in sets {
                let at = format!("[[{table}]] {:?}", set.name.chars().take(64).collect::<String>());
                let n = set.members.len();
                let (max, count) = if table == "group" {
                    (MAX_GROUP_MEMBERS, 1)
                } else {
                    (MAX_PAIR_MEMBERS, n.saturating_mul(n.saturating_sub(1)) / 2)
                };
                if n > max {
                    return Err(invalid(format!(
                        "{at}: {n} members; at most {max} are allowed in a {}",
                        if table == "group" { "group" } else { "pair set (each pair is a region)" }
                    )));
                }
                region_count = region_count.saturating_add(count);
                if region_count > MAX_REGIONS {
                    return Err(invalid(format!(
                        "more than {MAX_REGIONS} regions (counting every pair of every [[pairs]] set)"
                    )));
                }
                let size = match &set.size {
                    RawSize::Number(n) => u64::try_from(*n).unwrap_or(0),
                    RawSize::Text(t) => parse_size(t).unwrap_or(0),
                };
                total_size = total_size.saturating_add(size.saturating_mul(count as u64));
            }
        }
        if total_size > MAX_TOTAL_SIZE {
            return Err(invalid(format!(
                "the regions would take {} MiB in all; at most {} MiB are allowed",
                total_size >> 20,
                MAX_TOTAL_SIZE >> 20
            )));
        }
        if raw.members.len() > MAX_BINDINGS {
            return Err(invalid(format!("more than {MAX_BINDINGS} [members] bindings")));
        }
        let mut bindings = BTreeMap::new();
        for (name, b) in &raw.members {
            let at = format!("[members.{:?}]", name.chars().take(64).collect::<String>());
            check_name(name).map_err(|p| invalid(format!("[members]: {p}")))?;
            if b.uid.is_none() && b.gid.is_none() {
                return Err(invalid(format!("{at}: give uid, gid or both")));
            }
            if b.uid == Some(u32::MAX) || b.gid == Some(u32::MAX) {
                return Err(invalid(format!("{at}: 4294967295 is not a valid uid or gid")));
            }
            bindings.insert(name.as_str(), Binding { uid: b.uid, gid: b.gid });
        }
        for (what, g) in [("socket_group", raw.socket_group)] {
            if g == Some(u32::MAX) {
                return Err(invalid(format!("{what}: 4294967295 is not a valid gid")));
            }
        }
        let mut bound_used = HashSet::new();
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
                let shm_group = match set.shm_group {
                    Some(_) if !plain => {
                        return Err(invalid(format!(
                            "{at}: shm_group has no meaning for a doorbell region (its memory is a memfd)"
                        )))
                    }
                    Some(u32::MAX) => return Err(invalid(format!("{at}: 4294967295 is not a valid gid"))),
                    g => g,
                };
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
                for m in &set.members {
                    if bindings.contains_key(m.as_str()) {
                        bound_used.insert(m.as_str());
                    }
                }
                let mk = |name: String, members: Vec<String>, kind| RegionConfig {
                    bindings: members.iter().map(|m| bindings.get(m.as_str()).copied()).collect(),
                    name,
                    members,
                    size,
                    vectors,
                    plain,
                    ring,
                    kind,
                    shm_group,
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
        if let Some(unused) = bindings.keys().find(|m| !bound_used.contains(*m)) {
            return Err(invalid(format!("[members.{unused}] is not a member of any group or pair set")));
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
        Ok(Config {
            path: path.to_owned(),
            socket_dir: raw.socket_dir,
            socket_group: raw.socket_group,
            regions,
        })
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

/// `$IVCOM_RUNTIME_DIR/vm`, else `$XDG_RUNTIME_DIR/ivcom/vm`, else `/run/ivcom-vm` for root
/// (beside, not inside, root's private runtime directory `/run/ivcom`: the QEMU users of a
/// `socket_group` must be able to reach it), else `<temp dir>/ivcom-UID/vm`.
pub fn default_socket_dir() -> PathBuf {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = env("IVCOM_RUNTIME_DIR") {
        d.join("vm")
    } else if let Some(d) = env("XDG_RUNTIME_DIR") {
        d.join("ivcom").join("vm")
    } else {
        let uid = rustix::process::geteuid().as_raw();
        if uid == 0 {
            PathBuf::from("/run/ivcom-vm")
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

    #[test]
    fn sizes_are_bounded_before_expansion() {
        let err = |text: &str| Config::parse(text, Path::new("b.toml")).unwrap_err().to_string();
        let members: Vec<String> = (0..65).map(|i| format!("m{i}")).collect();
        let e = err(&format!("[[pairs]]\nname='p'\nmembers={members:?}\nsize='1M'\n"));
        assert!(e.contains("65 members; at most 64 are allowed in a pair set"), "{e}");
        let members: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
        let e = err(&format!("[[pairs]]\nname='p'\nmembers={members:?}\nsize='1G'\n"));
        assert!(e.contains("67584 MiB in all; at most 65536 MiB are allowed"), "{e}");
        let e = err(&"#".repeat(MAX_CONFIG_BYTES as usize + 1));
        assert!(e.contains("larger than 1048576 bytes"), "{e}");
    }

    #[test]
    fn bindings() {
        let c = Config::parse(
            "[members.a]\nuid=1001\n[members.b]\ngid=990\n[[group]]\nname='g'\nmembers=['a','b','c']\nsize='1M'\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let r = &c.regions[0];
        let (a, b, c_) = (r.bindings[0].as_ref(), r.bindings[1].as_ref(), r.bindings[2].as_ref());
        assert!(
            Binding::allows(a, 0, 1001, 5) && !Binding::allows(a, 0, 1002, 5) && Binding::allows(a, 7, 0, 0)
        );
        assert!(Binding::allows(b, 0, 1234, 990) && !Binding::allows(b, 0, 1234, 991));
        assert!(c_.is_none() && Binding::allows(c_, 7, 7, 7) && !Binding::allows(c_, 7, 8, 7));
        assert_eq!(Binding::socket_owner(a), (Some(1001), None, 0o600));
        assert_eq!(Binding::socket_owner(b), (None, Some(990), 0o660));
        assert_eq!(Binding::socket_owner(c_), (None, None, 0o600));
        let e = Config::parse(
            "[members.z]\nuid=1\n[[group]]\nname='g'\nmembers=['a']\nsize='1M'\n",
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[members.z] is not a member"), "{e}");
    }
}
