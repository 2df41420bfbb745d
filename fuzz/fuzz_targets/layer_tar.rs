//! A hostile tar given as a layer (`--layer`): vmrun's own tar reader and the unpacking into a
//! staging tree. Any input must end in an error or a tree, never a panic, and nothing may be
//! written outside the staging directory: its parent must hold only it afterwards. Runs as
//! root (mknod, chown, trusted.* xattrs), as `vmrun` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let parent = tempfile::tempdir().unwrap();
    let tree = parent.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let _ = vmrun::launch::layers::unpack_into(Path::new("fuzz.tar"), data, &tree);
    let left: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("tree")], "written outside the tree");
});
