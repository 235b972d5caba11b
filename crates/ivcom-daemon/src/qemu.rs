//! The QEMU command-line options that attach one member to its region.

use std::path::Path;

use crate::config::{socket_path, Config};

/// Why no options can be given.
#[derive(Debug, thiserror::Error)]
pub enum QemuArgsError {
    /// No region of that name.
    #[error("{path}: no region {region:?} (regions: {known})")]
    NoRegion {
        /// Configuration file.
        path: String,
        /// Region asked for.
        region: String,
        /// Regions there are.
        known: String,
    },
    /// Not a member of the region.
    #[error("{path}: {member:?} is not a member of region {region:?} (members: {known})")]
    NoMember {
        /// Configuration file.
        path: String,
        /// Region.
        region: String,
        /// Member asked for.
        member: String,
        /// Members there are.
        known: String,
    },
    /// `--plain` for a region served through doorbell sockets.
    #[error("{path}: region {region:?} is served through doorbell sockets (its memory is a memfd, not a /dev/shm file); drop --plain, or set plain = true for it")]
    NotPlain {
        /// Configuration file.
        path: String,
        /// Region.
        region: String,
    },
}

/// The options for `member` of `region`, one QEMU argument per element:
/// - doorbell regions: `-chardev socket,path=SOCK,id=ID -device ivshmem-doorbell,chardev=ID,vectors=N`;
/// - plain regions: `-object memory-backend-file,size=S,share=on,mem-path=/dev/shm/ivcom.REGION,id=ID
///   -device ivshmem-plain,memdev=ID`.
///
/// `plain` asks for the plain form; it is an error for a doorbell region (whose memory only
/// the daemon can hand out). Plain regions always get the plain form. Commas in paths are
/// doubled, as QEMU's option syntax wants.
pub fn qemu_args(
    config: &Config,
    socket_dir: &Path,
    region: &str,
    member: &str,
    plain: bool,
) -> Result<Vec<String>, QemuArgsError> {
    let path = config.path.display().to_string();
    let r = config.region(region).ok_or_else(|| QemuArgsError::NoRegion {
        path: path.clone(),
        region: region.to_owned(),
        known: config.regions.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "),
    })?;
    if r.peer_id(member).is_none() {
        return Err(QemuArgsError::NoMember {
            path,
            region: region.to_owned(),
            member: member.to_owned(),
            known: r.members.join(", "),
        });
    }
    let id = format!("ivcom-{}", r.name);
    if r.plain {
        let file = Path::new("/dev/shm").join(r.shm_file_name());
        return Ok(vec![
            "-object".into(),
            format!(
                "memory-backend-file,size={},share=on,mem-path={},id={id}",
                r.size,
                qemu_escape(&file.display().to_string())
            ),
            "-device".into(),
            format!("ivshmem-plain,memdev={id}"),
        ]);
    }
    if plain {
        return Err(QemuArgsError::NotPlain { path, region: region.to_owned() });
    }
    let sock = socket_path(socket_dir, &r.name, member);
    Ok(vec![
        "-chardev".into(),
        format!("socket,path={},id={id}", qemu_escape(&sock.display().to_string())),
        "-device".into(),
        format!("ivshmem-doorbell,chardev={id},vectors={}", r.vectors),
    ])
}

/// Joins arguments into one line a POSIX shell splits back into the same arguments.
pub fn shell_line(args: &[String]) -> String {
    let quote = |a: &String| {
        let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "_./,=:@%+-".contains(c));
        if plain {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    args.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// QEMU option values escape a comma by doubling it.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        let a = ["-chardev".to_string(), "socket,path=/a b/it's.sock,id=x".to_string()];
        assert_eq!(shell_line(&a), r"-chardev 'socket,path=/a b/it'\''s.sock,id=x'");
    }

    #[test]
    fn forms() {
        let c = Config::parse(
            "[[group]]\nname='lab'\nmembers=['vm1','vm2']\nsize='16M'\nvectors=2\n[[group]]\nname='p'\nmembers=['a']\nsize='1M'\nplain=true\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let a = qemu_args(&c, Path::new("/run/x,y"), "lab", "vm2", false).unwrap();
        assert_eq!(
            a,
            [
                "-chardev",
                "socket,path=/run/x,,y/lab/vm2.sock,id=ivcom-lab",
                "-device",
                "ivshmem-doorbell,chardev=ivcom-lab,vectors=2"
            ]
        );
        let p = qemu_args(&c, Path::new("/s"), "p", "a", true).unwrap();
        assert_eq!(
            p,
            [
                "-object",
                "memory-backend-file,size=1048576,share=on,mem-path=/dev/shm/ivcom.p,id=ivcom-p",
                "-device",
                "ivshmem-plain,memdev=ivcom-p"
            ]
        );
        let e = qemu_args(&c, Path::new("/s"), "lab", "vm1", true).unwrap_err().to_string();
        assert!(e.contains("doorbell sockets"), "{e}");
        let e = qemu_args(&c, Path::new("/s"), "lab", "vm3", false).unwrap_err().to_string();
        assert!(e.contains("\"vm3\" is not a member of region \"lab\""), "{e}");
        let e = qemu_args(&c, Path::new("/s"), "nope", "vm1", false).unwrap_err().to_string();
        assert!(e.contains("no region \"nope\""), "{e}");
    }
}
