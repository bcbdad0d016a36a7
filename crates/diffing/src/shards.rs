//! Sharded harvesting: many workers (processes, machines, Ray actors) each harvest one fixed part
//! of a corpus into the same store folder; a manifest, written last, joins the parts.
//!
//! - Part `I` of `N` holds a contiguous run of samples whose bounds fall on harvest-batch
//!   boundaries: with `B = ceil(samples / batch_size)` batches, part `I` holds batches
//!   `[I·B/N, (I+1)·B/N)` (integer division). Every batch is then the same batch as in the
//!   unsharded harvest, so the parts' rows are bitwise the unsharded rows.
//! - A part writes its row files under `part-IIIII-of-NNNNN/`, each atomically, then
//!   `part-IIIII-of-NNNNN.json` (what it holds, every file's SHA-256, the corpus hash) atomically,
//!   last: a part without its JSON is unfinished and is harvested again; a finished part is
//!   skipped by `--resume`.
//! - [`write_manifest`] joins the finished parts in part order into `paired.json` (rows and
//!   samples renumbered, every part with its sample range and file hashes, the missing parts
//!   listed). Readers see one store; training's batch order does not depend on files (see
//!   `train`), so a sharded store trains the same crosscoder as the unsharded one.

use crate::corpus::CorpusItem;
use crate::paired::{hex, PairedMeta, ShardInfo, MANIFEST};
// The parts' on-disk types live with the store's format (`paired`); here is the logic.
pub use crate::paired::{file_sha256, PartFile, PartInfo, PartManifest, ShardSpec, Sharding};
use crate::{invalid, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

pub fn corpus_sha256(corpus: &[CorpusItem]) -> String {
    let mut h = Sha256::new();
    for c in corpus {
        for field in [&c.id, &c.source, &c.text] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
    }
    hex(&h.finalize())
}

fn read_part(path: &Path) -> Result<PartManifest> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::DiffError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| crate::DiffError::Invalid(format!("{}: {e}", path.display())))
}

/// The finished part `shard` of this corpus in `dir`, when its JSON is there and every row file
/// still has the hash it was written with (what `--resume` skips).
pub fn finished_part(
    dir: &Path,
    shard: ShardSpec,
    corpus_sha: &str,
) -> Result<Option<PartManifest>> {
    let p = dir.join(format!("{}.json", shard.name()));
    if !p.exists() {
        return Ok(None);
    }
    let m = read_part(&p)?;
    if m.corpus_sha256 != corpus_sha {
        return invalid(format!(
            "{} was harvested from another corpus; harvest into another folder, or delete the store's part files to start over",
            p.display()
        ));
    }
    for f in &m.part.files {
        let fp = dir.join(&f.file);
        if !fp.exists() || file_sha256(&fp)? != f.sha256 {
            return Ok(None);
        }
    }
    Ok(Some(m))
}

/// Joins the finished parts in `dir` into `paired.json` (atomically) and returns it. Parts must
/// come from one corpus, one part count and one harvest setting; missing parts are listed.
pub fn write_manifest(dir: &Path) -> Result<PairedMeta> {
    let meta = join_parts(dir)?;
    save_manifest(dir, &meta)?;
    Ok(meta)
}

/// Writes `meta` (from [`join_parts`]) as `dir`'s `paired.json`, atomically.
pub fn save_manifest(dir: &Path, meta: &PairedMeta) -> Result<()> {
    let bytes =
        serde_json::to_vec_pretty(meta).map_err(|e| crate::DiffError::Invalid(e.to_string()))?;
    persona_lens_engine::io::write_atomic(&dir.join(MANIFEST), &bytes)?;
    Ok(())
}

/// The store the finished parts in `dir` make, without writing it.
pub fn join_parts(dir: &Path) -> Result<PairedMeta> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        crate::DiffError::Invalid(format!(
            "cannot read the store folder {}: {e}",
            dir.display()
        ))
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("part-") && n.ends_with(".json"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(crate::DiffError::NoParts {
            dir: dir.to_path_buf(),
        });
    }
    let parts: Vec<PartManifest> = names
        .iter()
        .map(|n| read_part(&dir.join(n)))
        .collect::<Result<_>>()?;
    let first = &parts[0];
    let count = first.part.count;
    for p in &parts[1..] {
        let same = p.part.count == count
            && p.corpus_sha256 == first.corpus_sha256
            && p.meta.models == first.meta.models
            && p.meta.hooks == first.meta.hooks
            && p.meta.chat_template == first.meta.chat_template
            && p.meta.alignment == first.meta.alignment
            && p.meta.dims == first.meta.dims;
        if !same {
            return invalid(format!(
                "{}: parts {} and {} come from different harvests (corpus, part count, models, hooks or alignment differ); keep one harvest per folder",
                dir.display(),
                first.part.index,
                p.part.index
            ));
        }
    }
    let mut meta = first.meta.clone();
    meta.rows = 0;
    meta.shards = vec![];
    meta.samples = vec![];
    let mut infos = vec![];
    for p in &parts {
        for s in &p.meta.samples {
            let mut s = s.clone();
            s.first_row += meta.rows;
            meta.samples.push(s);
        }
        meta.shards.extend(p.part.files.iter().map(|f| ShardInfo {
            file: f.file.clone(),
            rows: f.rows,
        }));
        meta.rows += p.part.rows;
        infos.push(p.part.clone());
    }
    let have: Vec<usize> = infos.iter().map(|p| p.index).collect();
    meta.sharding = Some(Sharding {
        count,
        corpus_sha256: first.corpus_sha256.clone(),
        corpus_samples: first.corpus_samples,
        missing: (0..count).filter(|i| !have.contains(i)).collect(),
        parts: infos,
    });
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_samples_once_on_batch_boundaries() {
        for n in [0, 1, 5, 16, 17, 100, 257] {
            for bs in [1, 4, 16] {
                for count in [1, 2, 3, 7] {
                    let mut next = 0;
                    for index in 0..count {
                        let r = ShardSpec { index, count }.sample_range(n, bs);
                        assert_eq!(r.start, next, "n {n} bs {bs} {index}/{count}");
                        assert!(r.start.is_multiple_of(bs) || r.start == n);
                        next = r.end;
                    }
                    assert_eq!(next, n, "n {n} bs {bs} count {count}");
                }
            }
        }
        // Balanced to within one batch.
        let sizes: Vec<usize> = (0..3)
            .map(|index| ShardSpec { index, count: 3 }.sample_range(100, 4).len())
            .collect();
        assert_eq!(sizes, vec![32, 32, 36]);
    }

    #[test]
    fn shard_specs_parse_and_refuse_in_one_line() {
        assert_eq!(
            "2/5".parse::<ShardSpec>().unwrap(),
            ShardSpec { index: 2, count: 5 }
        );
        assert_eq!(ShardSpec { index: 2, count: 5 }.to_string(), "2/5");
        assert_eq!(
            ShardSpec { index: 2, count: 5 }.name(),
            "part-00002-of-00005"
        );
        for bad in ["5/5", "1", "a/2", "0/0", "-1/3"] {
            let e = bad.parse::<ShardSpec>().unwrap_err();
            assert!(e.contains("I/N") && !e.contains('\n'), "{e}");
        }
    }
}
