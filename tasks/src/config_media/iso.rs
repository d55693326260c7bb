//! ISO 9660 images of a few small files held in memory, written with `hadris-iso`, with
//! Joliet and Rock Ridge as `xorriso -as mkisofs -J -r` writes them: the names installers
//! look for (`user-data`, `meta-data`, `network-config`, `ks.cfg`) keep their case and
//! length there, which ISO 9660's own 8.3 upper-case names cannot.

use std::io::Cursor;

use hadris_iso::read::PathSeparator;
use hadris_iso::write::options::{CreationFeatures, IsoFormatOptions};
use hadris_iso::write::{InputEntry, InputMetadata, InputTree, IsoImageWriter};

/// Files on the medium are read-only for everyone (what `-r` makes of them).
const FILE_MODE: u32 = 0o100_444;

/// An ISO 9660 image labelled `volume` holding `files` (name, contents) in its root.
pub fn image(volume: &str, files: &[(String, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let entries = files
        .iter()
        .map(|(name, contents)| {
            InputEntry::file(name.clone(), contents.clone()).with_metadata(InputMetadata {
                mode: Some(FILE_MODE),
                uid: Some(0),
                gid: Some(0),
                ..InputMetadata::default()
            })
        })
        .collect();
    let options = IsoFormatOptions {
        volume_name: volume.to_owned(),
        system_id: None,
        volume_set_id: None,
        publisher_id: None,
        preparer_id: None,
        application_id: Some("METALGRAPH".to_owned()),
        sector_size: 2048,
        path_separator: PathSeparator::ForwardSlash,
        features: CreationFeatures::extensions(),
        // The label is written as given: cloud-init looks for `cidata` in lower case.
        strict_charset: false,
    };
    let written = IsoImageWriter::create(
        Cursor::new(Vec::new()),
        InputTree::new(PathSeparator::ForwardSlash, entries),
        options,
    )
    .map_err(|e| format!("the ISO image could not be written: {e}"))?;
    Ok(written.into_inner())
}

#[cfg(test)]
mod tests {
    use metalgraph_testkit::isoinfo;

    use super::*;

    #[test]
    fn files_keep_their_names_under_joliet_and_rock_ridge() {
        let user_data = "#cloud-config\nhostname: rack1-u08\n".repeat(200);
        let files = vec![
            ("user-data".to_owned(), user_data.clone().into_bytes()),
            ("meta-data".to_owned(), b"instance-id: i-1\n".to_vec()),
            ("network-config".to_owned(), b"version: 2\n".to_vec()),
            ("ks.cfg".to_owned(), Vec::new()),
        ];
        let bytes = image("cidata", &files).unwrap();
        assert_eq!(bytes.len() % 2048, 0, "whole sectors");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("media.iso");
        std::fs::write(&path, &bytes).unwrap();

        let info = isoinfo(&path, &["-d"]);
        assert!(info.contains("Volume id: cidata"), "{info}");
        assert!(info.contains("Joliet"), "{info}");
        assert!(info.contains("Rock Ridge"), "{info}");
        for extension in ["-J", "-R"] {
            let listing = isoinfo(&path, &[extension, "-f"]);
            let mut names: Vec<&str> = listing.lines().collect();
            names.sort_unstable();
            assert_eq!(
                names,
                ["/ks.cfg", "/meta-data", "/network-config", "/user-data"],
                "{extension}"
            );
            for (name, contents) in &files {
                let read = isoinfo(&path, &[extension, "-x", &format!("/{name}")]);
                assert_eq!(read.as_bytes(), contents, "{extension} {name}");
            }
        }
        let oemdrv = image("OEMDRV", &files[3..]).unwrap();
        std::fs::write(&path, &oemdrv).unwrap();
        assert!(isoinfo(&path, &["-d"]).contains("Volume id: OEMDRV"));
    }
}
