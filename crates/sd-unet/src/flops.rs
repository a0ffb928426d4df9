//! Analytic FLOP count of one UNet forward pass (2 FLOPs per multiply-add of the convolutions,
//! linear layers and attention matmuls; norms, activations and element-wise ops are not
//! counted), as torch's `FlopCounterMode` counts them. Used by the benchmarks to report
//! throughput.

use crate::config::{TransformerConfig, UNetConfig};

/// Counts multiply-adds for a batch; `flops()` doubles them.
struct Counter {
    batch: u64,
    macs: u64,
}

impl Counter {
    fn conv(&mut self, (h, w): (usize, usize), cin: usize, cout: usize, k: usize) {
        self.macs += self.batch * (h * w * cin * cout * k * k) as u64;
    }

    fn linear(&mut self, rows: usize, cin: usize, cout: usize) {
        self.macs += self.batch * (rows * cin * cout) as u64;
    }

    fn resnet(&mut self, hw: (usize, usize), cin: usize, cout: usize, temb: usize) {
        self.conv(hw, cin, cout, 3);
        self.linear(1, temb, cout);
        self.conv(hw, cout, cout, 3);
        if cin != cout {
            self.conv(hw, cin, cout, 1);
        }
    }

    fn transformer(&mut self, (h, w): (usize, usize), c: usize, t: &TransformerConfig, seq: usize) {
        let n = h * w;
        let inner = t.num_heads * t.head_dim;
        self.linear(n, c, inner); // proj_in (1x1 conv or linear: the same count)
        for _ in 0..t.depth {
            // attn1: q, k, v, out projections and the two attention matmuls
            self.linear(n, inner, 4 * inner);
            self.macs += self.batch * (2 * n * n * inner) as u64;
            // attn2: q and out from the tokens, k and v from the context
            self.linear(n, inner, 2 * inner);
            self.linear(seq, t.cross_attention_dim, 2 * inner);
            self.macs += self.batch * (2 * n * seq * inner) as u64;
            // GEGLU feed-forward: inner -> 2 x 4 inner -> inner
            self.linear(n, inner, 8 * inner);
            self.linear(n, 4 * inner, inner);
        }
        self.linear(n, inner, c); // proj_out
    }
}

/// FLOPs of one forward pass (2 per multiply-add) of the convolutions, linear layers and
/// attention matmuls, for a batch of `batch` latents of `height` × `width` and an
/// `encoder_hidden_states` sequence of `seq_len` tokens. torch's `FlopCounterMode` gives the
/// same number for diffusers' model (tested on the four real configs).
pub fn forward_flops(
    config: &UNetConfig,
    batch: usize,
    height: usize,
    width: usize,
    seq_len: usize,
) -> u64 {
    let mut c = Counter {
        batch: batch as u64,
        macs: 0,
    };
    let temb = config.time_embed_dim;
    // An empty config (refused by `UNetConfig::validate`) counts no FLOPs.
    let Some(&c0) = config.block_out_channels.first() else {
        return 0;
    };
    c.linear(1, c0, temb);
    c.linear(1, temb, temb);
    if let Some(tt) = &config.text_time {
        c.linear(1, tt.projection_class_embeddings_input_dim, temb);
        c.linear(1, temb, temb);
    }
    let mut hw = (height, width);
    c.conv(hw, config.in_channels, c0, config.conv_in_kernel);
    let mut skip_sizes = vec![hw];
    for b in &config.down_blocks {
        for i in 0..b.num_layers {
            let cin = if i == 0 {
                b.in_channels
            } else {
                b.out_channels
            };
            c.resnet(hw, cin, b.out_channels, temb);
            if let Some(t) = &b.transformer {
                c.transformer(hw, b.out_channels, t, seq_len);
            }
            skip_sizes.push(hw);
        }
        if b.add_downsample {
            let p = config.downsample_padding;
            let down = |x: usize| (x + 2 * p).saturating_sub(3) / 2 + 1;
            hw = (down(hw.0), down(hw.1));
            c.conv(hw, b.out_channels, b.out_channels, 3);
            skip_sizes.push(hw);
        }
    }
    if let Some(m) = &config.mid_block {
        c.resnet(hw, m.channels, m.channels, temb);
        c.transformer(hw, m.channels, &m.transformer, seq_len);
        c.resnet(hw, m.channels, m.channels, temb);
    }
    for b in &config.up_blocks {
        for i in 0..b.num_layers {
            let skip = if i + 1 == b.num_layers {
                b.in_channels
            } else {
                b.out_channels
            };
            let cin = if i == 0 {
                b.prev_output_channels
            } else {
                b.out_channels
            };
            skip_sizes.pop();
            c.resnet(hw, cin + skip, b.out_channels, temb);
            if let Some(t) = &b.transformer {
                c.transformer(hw, b.out_channels, t, seq_len);
            }
        }
        if b.add_upsample {
            hw = skip_sizes.last().copied().unwrap_or((2 * hw.0, 2 * hw.1));
            c.conv(hw, b.out_channels, b.out_channels, 3);
        }
    }
    c.conv(hw, c0, config.out_channels, config.conv_out_kernel);
    2 * c.macs
}
