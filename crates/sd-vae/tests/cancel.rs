//! `decode_with_cancel`: the check runs before each tile and between the decoder's blocks, a
//! cancel at any of those checks ends the decode with `Error::Interrupted`, and a decode that is
//! never cancelled gives exactly `decode`'s pixels (tiled and untiled).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use common::{inputs, load};
use sd_core::{Cancel, Error};
use sd_vae::TileConfig;

/// A cancel that answers true from its `fire_at`-th check on (0-based; `usize::MAX`: never),
/// and the number of checks made.
fn counting(fire_at: usize) -> (Cancel, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    (
        Cancel::new(move || c.fetch_add(1, Ordering::Relaxed) >= fire_at),
        n,
    )
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn a_cancel_stops_the_decode_between_blocks_and_tiles() {
    let z = inputs()["latents_8"].clone(); // [1, 4, 8, 8]
    let mut vae = load("sd1", DType::F32, None);
    // One check before the tile, one before the mid block, one before each up block.
    let per_decode = 2 + vae.config().block_out_channels.len();
    for tiles in [1usize, 9] {
        if tiles > 1 {
            // 4-latent tiles every 3 latents over 8: 3 x 3 tiles
            vae.enable_tiling(Some(TileConfig {
                sample_size: 32,
                latent_size: 4,
                overlap_factor: 0.25,
            }))
            .unwrap();
        }
        let plain = vae.decode(&z).unwrap();
        let (never, checks) = counting(usize::MAX);
        let with = vae.decode_with_cancel(&z, &never).unwrap();
        assert_eq!(bits(&with), bits(&plain), "{tiles} tile(s): pixels changed");
        let n = checks.load(Ordering::Relaxed);
        assert_eq!(n, tiles * per_decode, "{tiles} tile(s): checks made");
        for fire_at in 0..n {
            let (cancel, checks) = counting(fire_at);
            match vae.decode_with_cancel(&z, &cancel) {
                Err(Error::Interrupted) => {}
                other => panic!("{tiles} tile(s), cancel at check {fire_at}: {other:?}"),
            }
            // it stopped at the first check that answered true
            assert_eq!(checks.load(Ordering::Relaxed), fire_at + 1);
        }
    }
}
