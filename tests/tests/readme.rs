//! The README's own lines, taken from the README (not copies of them), run as a newcomer runs
//! them (T4): the quick start's set-up line in a real terminal, ending in `vmrun bash` on the
//! default images (a command typed, its output read, `exit 7` → 7); then the library example,
//! in a crate of its own outside the workspace, run as a harness author would.
//! (`.ci/run` runs the README's test command the same way, through `scripts/readme.sh`.)

use std::path::{Path, PathBuf};
use std::process::Command;

use vmrun_tests::cli::{have_tmux, wait_file, Term};
use vmrun_tests::{t4_images, t4_rootfs, Budget};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The indented command lines of the README's "## Quick start" section, in order (the rule
/// `scripts/readme.sh` follows).
fn quick_start_lines(readme: &str) -> Vec<String> {
    let mut in_section = false;
    let mut out = Vec::new();
    for l in readme.lines() {
        if l.starts_with("## ") {
            in_section = l.starts_with("## Quick start");
        } else if in_section {
            if let Some(cmd) = l.strip_prefix("    ").filter(|c| !c.starts_with(' ')) {
                out.push(cmd.to_string());
            }
        }
    }
    out
}

/// The Rust code block of the README's "## As a library" section.
fn library_example(readme: &str) -> String {
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("As a library"))
        .expect("the README has an 'As a library' section");
    let start = section.find("```rust\n").expect("a rust code block") + "```rust\n".len();
    let len = section[start..].find("```").expect("the block ends");
    section[start..start + len].to_string()
}

#[test]
fn the_readme_lines_work_as_written() {
    let test = "the_readme_lines_work_as_written";
    if t4_images(test).is_none() || t4_rootfs(test).is_none() || !have_tmux(test) {
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines = quick_start_lines(&readme);
    assert!(lines.len() >= 2, "set-up and test lines: {lines:?}");
    let setup = &lines[0];
    assert!(
        setup.ends_with("vmrun bash"),
        "the set-up line opens a shell: {setup}"
    );
    assert_eq!(lines[1], "bash scripts/test.sh", "the test command");

    // The set-up line, in a terminal, from the top of the checkout.
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status");
    let cmd = format!(
        "cd {} && {setup}; echo $? > {}; sleep 60",
        repo().display(),
        status.display()
    );
    let t = Term::start("readme", &cmd, 120, 40);
    // Packages present, `cargo install` of a release build, images unchanged, then a boot.
    t.wait_for(
        "root@vmrun:~#",
        &Budget::new(
            "the set-up line to install vmrun and reach the guest's prompt",
            600,
            1200,
        ),
    );
    t.line("echo readme-$((6*7)) && touch /from-readme && ls /from-readme");
    t.wait_for(
        "readme-42",
        &Budget::new("the guest shell to answer", 30, 120),
    );
    t.wait_for(
        "\n/from-readme",
        &Budget::new("the overlay root to take a write", 30, 120),
    );
    t.line("exit 7");
    let code = wait_file(
        &status,
        &Budget::new("vmrun bash to exit", 30, 120),
        Some(&t),
    );
    assert_eq!(code, "7", "{}", t.screen());
    drop(t);

    // The library example, as its own crate outside the workspace; `vmrun` is found on PATH,
    // where the set-up line installed it.
    let krate = tempfile::tempdir().unwrap();
    std::fs::create_dir(krate.path().join("src")).unwrap();
    std::fs::write(
        krate.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"readme-harness\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nvmrun = {{ path = {:?} }}\n\n[workspace]\n",
            repo().join("vmm").canonicalize().unwrap()
        ),
    )
    .unwrap();
    std::fs::write(krate.path().join("src/main.rs"), library_example(&readme)).unwrap();
    // The workspace's lock pins the same dependency versions.
    std::fs::copy(repo().join("Cargo.lock"), krate.path().join("Cargo.lock")).unwrap();
    let target = vmrun::launch::images::cache_dir().join("readme-harness-target");
    let budget = Budget::new("the README's library example to build and run", 600, 1200);
    let mut c = Command::new("cargo");
    c.args(["run", "--quiet"])
        .current_dir(krate.path())
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("VMRUN_BIN")
        .env_remove("GONDOLIN_ROOT_OVERLAY");
    let (code, out, err) = vmrun_tests::cli::run(c, b"", &budget);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let tar = std::fs::read(krate.path().join("changes.tar")).unwrap();
    let entries = vmrun_tests::read_tar(&tar);
    assert_eq!(
        entries.get("work/in.txt").map(|e| e.data.as_slice()),
        Some(&b"hello\n"[..])
    );
}
