//! A hostile container image given to `vmrun images import`: the archive's tar index, its
//! JSON documents (index, manifests, config, docker's manifest.json), digests, gzip layers and
//! the layers applied onto one tree. Any input must end in an error or a tree, never a panic,
//! and nothing may be written outside the staging tree. Runs as root, as the import does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parent = tempfile::tempdir().unwrap();
    let archive = parent.path().join("archive.tar");
    std::fs::write(&archive, data).unwrap();
    let tree = parent.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let _ = vmrun::launch::oci::unpack_image(&archive, None, &tree);
    let mut left: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["archive.tar", "tree"], "written outside the tree");
});
