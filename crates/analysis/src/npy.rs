//! Minimal `.npy` (format 1.0, little-endian f32, C order) writer and reader for numpy users.

use crate::{AnalysisError, Result};
use std::path::Path;

pub fn to_bytes(data: &[f32], shape: &[usize]) -> Vec<u8> {
    let shape_s = match shape {
        [n] => format!("({n},)"),
        s => format!(
            "({})",
            s.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Pad so that magic (6) + version (2) + len (2) + header is a multiple of 64, ending in \n.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes an f32 array atomically.
pub fn write(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    persona_lens_engine::io::write_atomic(path, &to_bytes(data, shape))?;
    Ok(())
}

/// Reads an f32 `.npy` written by numpy or by [`write`]: (data, shape).
pub fn read(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let b = std::fs::read(path)
        .map_err(|e| AnalysisError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let bad =
        |why: &str| AnalysisError::Invalid(format!("{}: not an f32 .npy ({why})", path.display()));
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("bad magic"));
    }
    let (hl, start) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(
        b.get(start..start + hl)
            .ok_or_else(|| bad("short header"))?,
    )
    .map_err(|_| bad("header"))?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("dtype must be <f4, C order"));
    }
    let s = header.find("'shape': (").ok_or_else(|| bad("no shape"))? + 10;
    let e = header[s..].find(')').ok_or_else(|| bad("shape"))? + s;
    let shape: Vec<usize> = header[s..e]
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse().map_err(|_| bad("shape")))
        .collect::<Result<_>>()?;
    let data: Vec<f32> = b[start + hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if data.len() != shape.iter().product::<usize>() {
        return Err(bad("size does not match shape"));
    }
    Ok((data, shape))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_alignment() {
        let b = super::to_bytes(&[1.0, 2.0, 3.0], &[3]);
        let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        let dir = std::env::temp_dir().join(format!("pl-npy-{}", std::process::id()));
        let p = dir.join("x.npy");
        super::write(&p, &[1.0, -2.5, 3.0, 4.0], &[2, 2]).unwrap();
        let (d, s) = super::read(&p).unwrap();
        assert_eq!(s, vec![2, 2]);
        assert_eq!(d, vec![1.0, -2.5, 3.0, 4.0]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
