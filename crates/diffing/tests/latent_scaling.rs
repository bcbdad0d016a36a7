//! Latent Scaling against its closed form on a small case built by hand: a 2-model crosscoder
//! whose latents read and write chosen directions, and activations where the base model holds
//! each chat latent's direction at a planted scale. The expected β and ν are computed here from
//! the planted data with the authors' formula (β = ⟨d, Σ f y⟩ / (‖d‖² Σ f²), targets: error with
//! the latent's own contribution added back, and the full reconstruction), not by the code under
//! test.

use candle_core::{Device, Tensor};
use persona_lens_diffing::crosscoder::Layout;
use persona_lens_diffing::metrics::latent_scaling;
use persona_lens_diffing::{CodeNormalization, CrossCoder, Sparsity};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const D: usize = 6;
const F: usize = 4;

/// Encoder: latent j = ReLU(x_chat[j]) (chat dims 0..F); decoders: chat e_j, base `base_dec[j]`.
fn crosscoder(base_dec: [[f32; D]; F]) -> CrossCoder {
    let mut w_enc = vec![0f32; 2 * D * F];
    for j in 0..F {
        w_enc[D * F + j * F + j] = 1.0; // model 1 (chat), input dim j -> latent j
    }
    let mut w_dec = vec![0f32; 2 * F * D];
    for j in 0..F {
        w_dec[j * D..(j + 1) * D].copy_from_slice(&base_dec[j]);
        w_dec[F * D + j * D + j] = 1.0;
    }
    let dev = Device::Cpu;
    CrossCoder {
        w_enc: Tensor::from_vec(w_enc, (2, D, F), &dev).unwrap(),
        b_enc: Tensor::zeros(F, candle_core::DType::F32, &dev).unwrap(),
        w_dec: Tensor::from_vec(w_dec, (2, F, D), &dev).unwrap(),
        b_dec: Tensor::zeros((2, D), candle_core::DType::F32, &dev).unwrap(),
        code_norm: CodeNormalization::None,
        alpha_sae: 0.0,
        alpha_cc: 0.0,
        normaliser: None,
        sparsity: Sparsity::Relu,
        layout: Layout::Fresh,
        metadata: BTreeMap::new(),
    }
}

fn unit(j: usize) -> [f32; D] {
    let mut v = [0f32; D];
    v[j] = 1.0;
    v
}

/// β by the closed form over rows `(f_i, y_i)` with decoder vector `d`.
fn beta(f: &[f64], y: &[[f64; D]], d: &[f64; D]) -> f64 {
    let dd: f64 = d.iter().map(|v| v * v).sum();
    let ff: f64 = f.iter().map(|v| v * v).sum();
    let num: f64 = f
        .iter()
        .zip(y)
        .map(|(fi, yi)| fi * yi.iter().zip(d).map(|(a, b)| a * b).sum::<f64>())
        .sum();
    num / (dd * ff)
}

#[test]
fn latent_scaling_reproduces_the_closed_form_on_planted_scales() {
    // Latent 0: chat-only decoder, base holds its direction in what the crosscoder misses at
    // 0.2x -> ν^ε = 0.2, ν^r = 0: chat-specific. Latent 1: chat-only decoder, base holds it at
    // -0.8x (anti-aligned) -> ν^ε = -0.8: not chat-specific. Latent 2: shared (base decoder
    // e_2): ν^ε = ν^r = 1. Latent 3: base decoder 0.5 e_3 + 0.5 e_4, base error holds 0.1x of
    // e_3: ν^ε = 0.6, ν^r = 0.5.
    let mut base_dec = [[0f32; D]; F];
    base_dec[2] = unit(2);
    base_dec[3][3] = 0.5;
    base_dec[3][4] = 0.5;
    let cc = crosscoder(base_dec);
    let planted_error_scale = [0.2, -0.8, 0.0, 0.1];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let n = 400;
    let mut x = Vec::with_capacity(n * 2 * D);
    let mut rows = vec![];
    for _ in 0..n {
        let chat: [f64; D] = std::array::from_fn(|_| rng.random_range(-1.0..2.0));
        let f: [f64; F] = std::array::from_fn(|j| chat[j].max(0.0));
        // base = its reconstruction (Σ f_j base_dec_j) + planted error along chat decoders + noise
        let mut base = [0f64; D];
        for j in 0..F {
            for k in 0..D {
                base[k] += f[j] * base_dec[j][k] as f64;
            }
            base[j] += planted_error_scale[j] * f[j];
        }
        base[5] += rng.random_range(-0.5..0.5);
        x.extend(base.iter().map(|&v| v as f32));
        x.extend(chat.iter().map(|&v| v as f32));
        rows.push((base, chat, f));
    }
    let x = Tensor::from_vec(x, (n, 2, D), &Device::Cpu).unwrap();
    let got = latent_scaling(&cc, &x, &[0, 1, 2, 3]).unwrap();

    for (j, ls) in got.iter().enumerate() {
        let d_chat: [f64; D] = std::array::from_fn(|k| (k == j) as u8 as f64);
        let f: Vec<f64> = rows.iter().map(|r| r.2[j]).collect();
        // reconstructions by hand: Σ_l f_l dec_l (biases are zero)
        let recon = |r: &([f64; D], [f64; D], [f64; F]), chat: bool| -> [f64; D] {
            std::array::from_fn(|k| {
                (0..F)
                    .map(|l| {
                        r.2[l]
                            * if chat {
                                (k == l) as u8 as f64
                            } else {
                                base_dec[l][k] as f64
                            }
                    })
                    .sum()
            })
        };
        let own = |r: &([f64; D], [f64; D], [f64; F]), chat: bool| -> [f64; D] {
            std::array::from_fn(|k| {
                r.2[j]
                    * if chat {
                        (k == j) as u8 as f64
                    } else {
                        base_dec[j][k] as f64
                    }
            })
        };
        let err = |chat: bool| -> Vec<[f64; D]> {
            rows.iter()
                .map(|r| {
                    let xm = if chat { r.1 } else { r.0 };
                    let (rc, o) = (recon(r, chat), own(r, chat));
                    std::array::from_fn(|k| xm[k] - (rc[k] - o[k]))
                })
                .collect()
        };
        let rec = |chat: bool| -> Vec<[f64; D]> { rows.iter().map(|r| recon(r, chat)).collect() };
        let want = [
            beta(&f, &err(false), &d_chat),
            beta(&f, &err(true), &d_chat),
            beta(&f, &rec(false), &d_chat),
            beta(&f, &rec(true), &d_chat),
        ];
        let have = [
            ls.beta_error_base,
            ls.beta_error_chat,
            ls.beta_recon_base,
            ls.beta_recon_chat,
        ];
        for (w, h) in want.iter().zip(have) {
            assert!((w - h).abs() < 1e-4, "latent {j}: β {h} vs closed form {w}");
        }
        assert!((ls.nu_error - want[0] / want[1]).abs() < 1e-4, "latent {j}");
        assert!((ls.nu_recon - want[2] / want[3]).abs() < 1e-4, "latent {j}");
        // the planted scale itself: what the base error holds along e_j plus the latent's own
        // base decoder along e_j (no noise on these dims: exact up to f32)
        let planted = planted_error_scale[j] + base_dec[j][j] as f64;
        assert!(
            (ls.nu_error - planted).abs() < 1e-4,
            "latent {j}: ν^ε {} vs planted {planted}",
            ls.nu_error,
        );
    }
    // ν^r: base reconstructions hold latents 2 (e_2) fully, 3 not along e_3 only: 0.5
    assert!(got[0].nu_recon.abs() < 1e-6 && got[1].nu_recon.abs() < 1e-6);
    assert!((got[2].nu_recon - 1.0).abs() < 1e-4);
    assert!((got[3].nu_recon - 0.5).abs() < 1e-4);
    let specific: Vec<bool> = got.iter().map(|l| l.chat_specific).collect();
    assert_eq!(specific, [true, false, false, false]);
}

#[test]
fn nu_is_undefined_when_the_chat_model_does_not_hold_the_direction() {
    // Chat decoder -e_0 while the chat activation that drives the latent points along +e_0: the
    // chat error target projects negatively (β^ε_chat = -1), the base barely holds the
    // direction (β^ε_base = -0.01). The naive ratio 0.01 would pass the 0.3 cut; the guard
    // makes ν^ε undefined and the latent not chat-specific.
    let mut cc = crosscoder([[0f32; D]; F]);
    cc.w_dec = (cc.w_dec.clone() * -1.0).unwrap();
    let n = 50;
    let mut x = Vec::with_capacity(n * 2 * D);
    for i in 0..n {
        let a = 0.5 + i as f32 / n as f32;
        let mut base = [0f32; D];
        base[0] = 0.01 * a;
        let mut chat = [0f32; D];
        chat[0] = a;
        x.extend(base);
        x.extend(chat);
    }
    let x = Tensor::from_vec(x, (n, 2, D), &Device::Cpu).unwrap();
    let got = &latent_scaling(&cc, &x, &[0]).unwrap()[0];
    assert!((got.beta_error_chat + 1.0).abs() < 1e-5, "{got:?}");
    assert!((got.beta_error_base + 0.01).abs() < 1e-5, "{got:?}");
    assert!((got.beta_recon_chat - 1.0).abs() < 1e-5 && got.beta_recon_base.abs() < 1e-6);
    assert!(got.nu_error.is_nan(), "{got:?}");
    assert!(!got.chat_specific);
}
