//! Intel MKL's `sgemm` for every f32 matrix product, loaded at run time where it is installed.
//!
//! Why: on a 2-core Xeon with AVX-512 (bench/README.md), MKL's sgemm made `bench-forward` 1.3-1.6x
//! faster than gemm's kernels at batch 1 and 16 on both models; HF transformers runs on the same
//! library (PyTorch's CPU builds use MKL). It is loaded with `dlopen`, not linked: the build is the
//! same with or without it, and where no MKL is found every product runs on gemm as before.
//!
//! Where it looks, first hit wins:
//! 1. `PERSONA_LENS_MKL`: a path to `libmkl_rt.so.N` or to a folder holding it; `off` turns MKL off.
//! 2. `mkl/lib/` of the persona-lens checkout this crate was built from (what `make mkl` fills
//!    from PyPI's `mkl` wheel).
//! 3. `libmkl_rt.so.3` / `.so.2` on the loader's search path (`LD_LIBRARY_PATH`, system folders).
//!
//! The products go through gemm's f32 entry point (vendor/gemm-common's `set_f32_gemm_hook`), so
//! candle's matmul, the crosscoder's training step and every analysis use it without changes.
//! Layouts BLAS cannot express (no unit stride on either side) fall back to gemm's kernels.

use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Environment variable: where MKL's runtime library is, or `off`.
pub const MKL_VAR: &str = "PERSONA_LENS_MKL";

/// The library names tried in a folder and on the loader's search path, newest first.
const LIBRARY_NAMES: [&str; 3] = ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"];

// mkl_service.h: MKL_THREADING_INTEL = 0, SEQUENTIAL = 1, PGI = 2, GNU = 3, TBB = 4.
const MKL_THREADING_SEQUENTIAL: c_int = 1;
const MKL_THREADING_GNU: c_int = 3;

type Sgemm = unsafe extern "C" fn(
    transa: *const c_char,
    transb: *const c_char,
    m: *const c_int,
    n: *const c_int,
    k: *const c_int,
    alpha: *const f32,
    a: *const f32,
    lda: *const c_int,
    b: *const f32,
    ldb: *const c_int,
    beta: *const f32,
    c: *mut f32,
    ldc: *const c_int,
);
type SetThreadingLayer = unsafe extern "C" fn(c_int) -> c_int;
type SetNumThreadsLocal = unsafe extern "C" fn(c_int) -> c_int;
type DisableFastMm = unsafe extern "C" fn() -> c_int;
type GetVersionString = unsafe extern "C" fn(*mut c_char, c_int);

struct Mkl {
    // Kept so the function pointers below stay valid for the life of the process.
    _library: libloading::Library,
    sgemm: Sgemm,
    set_num_threads_local: SetNumThreadsLocal,
}

/// Which matrix multiply the process's f32 products run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatmulBackend {
    /// MKL's sgemm: the library's path and MKL's own version string.
    Mkl { path: PathBuf, version: String },
    /// gemm's kernels (the crate candle ships with); `why` says why MKL is not used.
    Gemm { why: String },
}

impl MatmulBackend {
    /// A short label for tables and provenance: `mkl 2026.0.2` or `gemm`.
    pub fn label(&self) -> String {
        match self {
            MatmulBackend::Mkl { version, .. } => {
                // "Intel(R) oneAPI Math Kernel Library Version 2026.2-Product Build ..." -> 2026.2
                let number = version
                    .split_whitespace()
                    .skip_while(|w| *w != "Version")
                    .nth(1)
                    .map(|v| v.split('-').next().unwrap_or(v).to_string())
                    .unwrap_or_else(|| version.clone());
                format!("mkl {number}")
            }
            MatmulBackend::Gemm { .. } => "gemm".to_string(),
        }
    }
}

static MKL: OnceLock<Option<Mkl>> = OnceLock::new();
/// Products MKL computed in this process (diagnostics and the routing test).
static MKL_PRODUCTS: AtomicU64 = AtomicU64::new(0);

/// How many f32 products MKL has computed in this process.
pub fn mkl_product_count() -> u64 {
    MKL_PRODUCTS.load(Ordering::Relaxed)
}
static BACKEND: OnceLock<MatmulBackend> = OnceLock::new();

/// Loads MKL once and routes f32 products to it when it loads and passes a check product.
/// Returns what the process's products run on. Idempotent; called by [`crate::tune_cpu_pools`].
pub fn init() -> &'static MatmulBackend {
    BACKEND.get_or_init(|| {
        let (mkl, backend) = match load() {
            Ok((mkl, path, version)) => (Some(mkl), MatmulBackend::Mkl { path, version }),
            Err(why) => (None, MatmulBackend::Gemm { why }),
        };
        let loaded = mkl.is_some();
        let _ = MKL.set(mkl);
        if loaded {
            gemm_common::set_f32_gemm_hook(Some(mkl_gemm));
        }
        backend
    })
}

/// What [`init`] chose (initialising if needed).
pub fn matmul_backend() -> &'static MatmulBackend {
    init()
}

fn candidates() -> Result<Vec<PathBuf>, String> {
    let in_folder =
        |dir: &Path| -> Vec<PathBuf> { LIBRARY_NAMES.iter().map(|name| dir.join(name)).collect() };
    if let Some(value) = std::env::var_os(MKL_VAR) {
        let value = PathBuf::from(value);
        if value.as_os_str() == "off" || value.as_os_str() == "0" {
            return Err(format!("{MKL_VAR}=off"));
        }
        return Ok(if value.is_dir() {
            in_folder(&value)
        } else {
            vec![value]
        });
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mkl/lib");
    let mut paths = in_folder(&checkout);
    paths.extend(LIBRARY_NAMES.iter().map(PathBuf::from));
    Ok(paths)
}

fn load() -> Result<(Mkl, PathBuf, String), String> {
    let paths = candidates()?;
    let explicit = std::env::var_os(MKL_VAR).is_some();
    let mut last_error = String::from("no libmkl_rt found (run `make mkl`)");
    let mut tried_path = false;
    for path in paths {
        // A bare name goes to the loader's search; a path must exist.
        if path.components().count() > 1 && !path.exists() {
            continue;
        }
        tried_path |= path.components().count() > 1;
        // SAFETY: loading MKL runs its initialisers, which only set up its own state.
        match unsafe { libloading::Library::new(&path) } {
            Ok(library) => match bind(library) {
                Ok((mkl, version)) => {
                    if let Err(why) = check(&mkl) {
                        last_error = format!("{}: {why}", path.display());
                        continue;
                    }
                    return Ok((mkl, path, version));
                }
                Err(why) => last_error = format!("{}: {why}", path.display()),
            },
            // A bare name not on the search path says less than an earlier path's failure.
            Err(e) if path.components().count() > 1 || !tried_path => {
                last_error = format!("{}: {e}", path.display())
            }
            Err(_) => {}
        }
    }
    if explicit {
        eprintln!(
            "warning: {MKL_VAR} is set but MKL did not load ({last_error}); matrix products run on gemm. \
             Point it at libmkl_rt.so.N or its folder (`make mkl` puts one in mkl/lib), or unset it."
        );
    }
    Err(last_error)
}

fn bind(library: libloading::Library) -> Result<(Mkl, String), String> {
    // SAFETY: the symbols' types are MKL's documented C/Fortran signatures (LP64 interface,
    // mkl_rt's default: 32-bit integers).
    unsafe {
        let sgemm = *library
            .get::<Sgemm>(b"sgemm_\0")
            .map_err(|e| e.to_string())?;
        let set_layer = *library
            .get::<SetThreadingLayer>(b"MKL_Set_Threading_Layer\0")
            .map_err(|e| e.to_string())?;
        let set_num_threads_local = *library
            .get::<SetNumThreadsLocal>(b"MKL_Set_Num_Threads_Local\0")
            .map_err(|e| e.to_string())?;
        // mkl_rt's default threading layer is Intel OpenMP (libiomp5), which PyPI's `mkl` wheel
        // does not bring; MKL exits the process when a layer fails to load. GCC's OpenMP is on
        // every machine with gcc; without it, one thread per product. Set before any other MKL call:
        // the first one loads the layer.
        if std::env::var_os("MKL_THREADING_LAYER").is_none() {
            let gomp = libloading::Library::new("libgomp.so.1").is_ok();
            set_layer(if gomp {
                MKL_THREADING_GNU
            } else {
                MKL_THREADING_SEQUENTIAL
            });
        }
        // MKL's own allocator keeps each calling thread's packing buffers for reuse and never
        // returns them: a server whose requests land on ever new threads grew 110 MiB per round
        // of eight sessions (crates/serve/tests/test_dashboard.py, flat-memory test). Plain
        // malloc/free instead; no slower there (20.0 ms per token, 21.6 with the cache:
        // bench/README.md). Also before any product: MKL reads the setting when it first
        // allocates.
        let disable_fast_mm = *library
            .get::<DisableFastMm>(b"mkl_disable_fast_mm\0")
            .map_err(|e| e.to_string())?;
        disable_fast_mm();
        let version = match library.get::<GetVersionString>(b"MKL_Get_Version_String\0") {
            Ok(get) => {
                let mut buf = [0 as c_char; 256];
                get(buf.as_mut_ptr(), buf.len() as c_int);
                CStr::from_ptr(buf.as_ptr())
                    .to_string_lossy()
                    .trim()
                    .to_string()
            }
            Err(_) => "unknown version".to_string(),
        };
        Ok((
            Mkl {
                _library: library,
                sgemm,
                set_num_threads_local,
            },
            version,
        ))
    }
}

/// One small product through MKL against the textbook sum: a library with another integer
/// width or a broken install is refused here rather than trusted with every product.
fn check(mkl: &Mkl) -> Result<(), String> {
    let (m, n, k) = (3usize, 4usize, 5usize);
    let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
    let mut got = vec![f32::NAN; m * n];
    // Row-major operands and output, as candle lays them out.
    let ok = unsafe {
        gemm_via(
            mkl,
            m,
            n,
            k,
            got.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            1,
        )
    };
    if !ok {
        return Err("check product's layout refused".into());
    }
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k).map(|l| lhs[i * k + l] * rhs[l * n + j]).sum();
            if (got[i * n + j] - want).abs() > 1e-5 {
                return Err(format!(
                    "check product wrong at ({i}, {j}): {} vs {want}",
                    got[i * n + j]
                ));
            }
        }
    }
    Ok(())
}

/// The BLAS view of a matrix of `rows` x `cols` with strides `rs`, `cs`: column-major with
/// leading dimension `ld` (returned) when rows are unit-stride. Size-1 sides may have any stride.
fn column_major(rows: usize, cols: usize, rs: isize, cs: isize) -> Option<c_int> {
    let tall = rows.max(1);
    if rows == 0 || cols == 0 {
        // Nothing is read (a depth-0 product's operands): any valid ld will do.
        return c_int::try_from(tall).ok();
    }
    let unit_rows = rs == 1 || rows <= 1;
    let ld = if cols <= 1 { tall as isize } else { cs };
    (unit_rows && ld >= tall as isize && ld <= c_int::MAX as isize).then_some(ld as c_int)
}

/// An operand as BLAS takes it: `N` (column-major) or `T` (row-major, read transposed).
fn operand(rows: usize, cols: usize, rs: isize, cs: isize) -> Option<(c_char, c_int)> {
    column_major(rows, cols, rs, cs)
        .map(|ld| (b'N' as c_char, ld))
        .or_else(|| column_major(cols, rows, cs, rs).map(|ld| (b'T' as c_char, ld)))
}

/// Products of fewer multiply-adds than this run on one thread.
const SINGLE_THREAD_BELOW: usize = 1 << 20;

/// gemm's hook: see `gemm_common::F32GemmHook` for the contract.
#[allow(clippy::too_many_arguments)]
unsafe fn mkl_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    threads: usize,
) -> bool {
    let Some(Some(mkl)) = MKL.get() else {
        return false;
    };
    // candle asks for every core on every product; for the small ones (attention's per-head
    // products) MKL's fork and join cost more than the second core saves.
    let threads = match m.saturating_mul(n).saturating_mul(k) < SINGLE_THREAD_BELOW {
        true => 1,
        false => threads,
    };
    let done = gemm_via(
        mkl, m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
        alpha, beta, threads,
    );
    if done {
        MKL_PRODUCTS.fetch_add(1, Ordering::Relaxed);
    }
    done
}

/// dst := alpha * dst (when read_dst) + beta * lhs * rhs, gemm's convention, on MKL's sgemm.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_via(
    mkl: &Mkl,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    threads: usize,
) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if [m, n, k].iter().any(|&d| d > c_int::MAX as usize) {
        return false;
    }
    // BLAS writes a column-major C. A row-major dst is the column-major transpose:
    // dst^T = rhs^T lhs^T, so swap the operands and read each one's strides the other way.
    let (rows, cols, ldc, a, a_rs, a_cs, b, b_rs, b_cs) =
        if let Some(ldc) = column_major(m, n, dst_rs, dst_cs) {
            (m, n, ldc, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs)
        } else if let Some(ldc) = column_major(n, m, dst_cs, dst_rs) {
            (n, m, ldc, rhs, rhs_cs, rhs_rs, lhs, lhs_cs, lhs_rs)
        } else {
            return false;
        };
    let (Some((transa, lda)), Some((transb, ldb))) =
        (operand(rows, k, a_rs, a_cs), operand(k, cols, b_rs, b_cs))
    else {
        return false;
    };
    let (rows, cols, depth) = (rows as c_int, cols as c_int, k as c_int);
    // gemm scales the product by `beta` and the old dst by `alpha`; BLAS the other way round.
    let (blas_alpha, blas_beta) = (beta, if read_dst { alpha } else { 0.0 });
    (mkl.set_num_threads_local)(threads.clamp(1, c_int::MAX as usize) as c_int);
    (mkl.sgemm)(
        &transa,
        &transb,
        &rows,
        &cols,
        &depth,
        &blas_alpha,
        a,
        &lda,
        b,
        &ldb,
        &blas_beta,
        dst,
        &ldc,
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The environment variable that makes a missing MKL fail the MKL tests instead of skipping
    /// them: `make test` sets it where `make mkl` installed the library, so CI cannot pass
    /// without running them.
    const REQUIRE_VAR: &str = "PERSONA_LENS_REQUIRE_MKL";

    fn loaded() -> Option<&'static Mkl> {
        init();
        match MKL.get() {
            Some(Some(mkl)) => Some(mkl),
            _ => {
                let why = format!("{:?}", matmul_backend());
                assert!(
                    std::env::var_os(REQUIRE_VAR).is_none(),
                    "{REQUIRE_VAR} is set but MKL did not load: {why}"
                );
                eprintln!("skipped: MKL not loaded ({why})");
                None
            }
        }
    }

    /// A deterministic, sign-mixed fill.
    fn fill(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.7131).sin())
            .collect()
    }

    /// Strides of a rows x cols matrix stored row-major (`true`) or column-major, with `pad`
    /// unused elements after each leading-dimension run (BLAS's ld > rows case).
    fn strides(rows: usize, cols: usize, row_major: bool, pad: usize) -> (isize, isize, usize) {
        if row_major {
            let ld = cols + pad;
            (ld as isize, 1, rows * ld)
        } else {
            let ld = rows + pad;
            (1, ld as isize, cols * ld)
        }
    }

    /// Every layout candle and the crosscoder hand to gemm (and BLAS's padded leading
    /// dimensions), with and without accumulation into dst, against the textbook sum in f64.
    /// The expected values never touch MKL or the layout mapping under test.
    #[test]
    fn mkl_products_equal_the_textbook_sum_on_every_layout() {
        let Some(mkl) = loaded() else { return };
        let shapes = [(7, 5, 3), (1, 9, 4), (6, 1, 8), (33, 17, 0), (40, 70, 129)];
        let mut checked = 0;
        for &(m, n, k) in &shapes {
            for layout in 0..8u32 {
                let (dst_row, lhs_row, rhs_row) =
                    (layout & 1 == 0, layout & 2 == 0, layout & 4 == 0);
                for (pad, read_dst) in [(0, false), (3, true)] {
                    let (dst_rs, dst_cs, dst_len) = strides(m, n, dst_row, pad);
                    let (lhs_rs, lhs_cs, lhs_len) = strides(m, k, lhs_row, pad);
                    let (rhs_rs, rhs_cs, rhs_len) = strides(k, n, rhs_row, pad);
                    let (lhs, rhs) = (fill(lhs_len, 1.0), fill(rhs_len, 2.0));
                    let old = fill(dst_len, 3.0);
                    let mut dst = old.clone();
                    let (alpha, beta) = (0.5f32, -1.25f32);
                    let ok = unsafe {
                        gemm_via(
                            mkl,
                            m,
                            n,
                            k,
                            dst.as_mut_ptr(),
                            dst_cs,
                            dst_rs,
                            read_dst,
                            lhs.as_ptr(),
                            lhs_cs,
                            lhs_rs,
                            rhs.as_ptr(),
                            rhs_cs,
                            rhs_rs,
                            alpha,
                            beta,
                            2,
                        )
                    };
                    assert!(ok, "layout {layout} pad {pad} of {m}x{n}x{k} refused");
                    let at = |i: usize, j: usize, rs: isize, cs: isize| {
                        (i as isize * rs + j as isize * cs) as usize
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let (mut sum, mut size) = (0f64, 0f64);
                            for l in 0..k {
                                let p = lhs[at(i, l, lhs_rs, lhs_cs)] as f64
                                    * rhs[at(l, j, rhs_rs, rhs_cs)] as f64;
                                sum += p;
                                size += p.abs();
                            }
                            let d = at(i, j, dst_rs, dst_cs);
                            let prior = if read_dst {
                                alpha as f64 * old[d] as f64
                            } else {
                                0.0
                            };
                            let want = prior + beta as f64 * sum;
                            // f32 accumulation of k products: at most about k ulps of their
                            // absolute sum, plus the rounding of the scaled terms.
                            let bound = (k as f64 + 4.0)
                                * f32::EPSILON as f64
                                * (beta.abs() as f64 * size + prior.abs() + 1.0);
                            let got = dst[d] as f64;
                            assert!(
                                (got - want).abs() <= bound,
                                "{m}x{n}x{k} layout {layout} pad {pad} read_dst {read_dst} at ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, shapes.len() * 16);
    }

    /// Through gemm's entry point (what candle calls): the hook is installed and a product
    /// neither side of which BLAS can take still comes out right (gemm's kernel).
    #[test]
    fn gemm_routes_f32_products_to_mkl_and_falls_back_on_strided_ones() {
        if loaded().is_none() {
            return;
        }
        assert!(gemm_common::f32_gemm_hook().is_some());
        let before = mkl_product_count();
        let (a, b) = (fill(12, 6.0), fill(12, 7.0));
        let mut c = vec![0f32; 9];
        // 3 x 4 by 4 x 3, row-major: MKL takes it.
        unsafe {
            gemm::gemm(
                3,
                3,
                4,
                c.as_mut_ptr(),
                1,
                3,
                false,
                a.as_ptr(),
                1,
                4,
                b.as_ptr(),
                1,
                3,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        assert!(mkl_product_count() > before, "gemm did not call MKL");
        let want: f32 = (0..4).map(|l| a[l] * b[l * 3]).sum();
        assert!((c[0] - want).abs() < 1e-5);
        let (m, n, k) = (5usize, 6usize, 7usize);
        // lhs with strides (2k, 2): every other element, no unit stride.
        let lhs = fill(m * 2 * k, 4.0);
        let rhs = fill(k * n, 5.0);
        let mut dst = vec![0f32; m * n];
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                2,
                (2 * k) as isize,
                rhs.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k)
                    .map(|l| lhs[i * 2 * k + 2 * l] * rhs[l * n + j])
                    .sum();
                assert!((dst[i * n + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn blas_views_of_strided_matrices() {
        // 3 x 4 row-major: read transposed with ld 4.
        assert_eq!(operand(3, 4, 4, 1), Some((b'T' as c_char, 4)));
        // 3 x 4 column-major: as is, ld 3.
        assert_eq!(operand(3, 4, 1, 3), Some((b'N' as c_char, 3)));
        // A row vector with a junk row stride is still column-major with ld = 1 column step.
        assert_eq!(column_major(1, 4, 99, 1), Some(1));
        // Neither side unit-stride: refused (gemm's kernel takes it).
        assert_eq!(operand(3, 4, 8, 2), None);
        // Negative strides: refused.
        assert_eq!(operand(3, 4, -4, 1), None);
    }
}
