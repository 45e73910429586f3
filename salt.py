"""SALT on SAM's image encoder, prompt-free: scale and shift the top singular values of each frozen weight,
and add a low-rank update in the subspace of the other singular directions. With --s-sam: the S-SAM baseline.

Papers: Elsayed et al., "SALT: Parameter-Efficient Fine-Tuning via Singular Value Adaptation with Low-Rank
Transformation", arXiv 2503.16055, code github.com/BioMedIA-MBZUAI/SALT. S-SAM: Paranjape et al., arXiv 2408.06447.

What the method does, in the order of this file (as in lora.py for everything outside the adapted layers):
1. Every adapted frozen weight W (D x K; a conv kernel is flattened to out x in*kh*kw) is decomposed once,
   W = U diag(s) Vt, R = min(D, K) singular values. The top r get a trainable scale a (init 1) and shift
   b (init 0); the other R - r get a trainable low-rank update X Y added to that (R-r) x (R-r) block of
   Sigma (X: (R-r) x rank, Y: rank x (R-r)). The layer then uses W~ = U ReLU(Sigma') Vt, with
       Sigma' = [ diag(a * s_top + b)        0           ]
                [        0           diag(s_rest) + X Y  ].
2. LayerNorms of the image encoder train (the paper's rule: parameters whose name contains "norm"),
   and so does the mask decoder (as SAMed and lora.py; the paper trains only the decoder's norms).
3. Loss: segmentation loss + reg_weight * sum over layers of ||a*s_top + b - s_top|| + ||X Y||_F
   (the paper's eq. 5, plain norms as its code).
Layers adapted: attention qkv and proj, MLP lin1/lin2 of every ViT block, and the neck's 1x1 and 3x3
convolutions; in MobileSAM's TinyViT the same roles: attention qkv/proj and MLP fc1/fc2 of the blocks of
layers[1:] (layers[0] is convolutional) and its neck, which is the same conv/LN/conv/LN Sequential.

Differences from the authors' recipe (SALT_config.yml, main.py and train.py of their code; the loop every
method shares is common.py's):
  what           SALT                                           this file
  loss           focal (alpha 0.75, gamma 3, on probabilities)  0.2 CE + 0.8 foreground Dice on full-size labels,
                 + soft Dice on one sigmoid mask; regulariser   softmax over background + classes; regulariser
                 weight 0.01 in the paper, 0 in the config      weight 0 as the config (--reg-weight; see below)
  optimiser      AdamW                                          the same
  learning rate  1e-4                                           1e-3 (--lr; several classes: 3e-3)
  weight decay   0.01                                           the same (--weight-decay)
  warm-up        none (configured, but its scheduler unused)    50 steps, linear (--warmup; at most a tenth of --steps)
  schedule       StepLR(200 epochs, 0.2): constant for the run  poly 0.9, reaching 0 at the last step
  batch          2 (the loader's hard-coded value; config: 8)   8 on a GPU, 2 on a CPU (--batch-size)
  length         200 epochs (DRIVE: 14 images, 1,400 steps)     1000 steps on a GPU (--steps)
  input size     512 (resized to 511 on the long side and       MobileSAM's TinyViT at 1024 (--model, --img-size);
                 zero-padded); a ViT-B without windows or       crops of 1/zoom of the image (--zoom; DRIVE: 2)
                 rel-pos, or SAM 2's Hiera (the shipped config)
  prompts        the class name through CLIP ViT-B/32 and a     none (the no-mask embedding)
                 trained affine layer: one sparse token
  what trains    SALT parts; every parameter named "norm"       SALT parts; the encoder's norms; the mask decoder
                 (encoder and decoder-transformer norms);       (spare tokens' hypernetworks frozen); the no-mask
                 pos_embed; the text affine layer               embedding; pos_embed frozen
  augmentation   flip, rotation 1-10 deg, brightness            the same kind (flip, rotation +-10 deg, brightness)
S-SAM's (its eval/ultrasound/model_svdtuning.yml): focal loss, regulariser weight 0, lr 1e-3, batch 32,
1000 epochs, StepLR(100, 0.5), input 256, and a, b, pos_embed, LayerNorms and the text affine layer train
(decoder frozen). With --s-sam this file keeps the recipe above, so SALT and S-SAM differ only in the layer.

Choices of this file (the paper and its code leave them open or do otherwise):
* r per layer type is a fraction of R (--top-attn/--top-mlp/--top-neck). The authors' ViT-B setting is
  760/768 (qkv, proj), 50/768 (MLP), 250/256 (neck); the defaults 0.99/0.065/0.977 give exactly those on
  ViT-B and scale to TinyViT's narrower layers (dims 128/160/320), where absolute counts would not fit.
  A value >= 1 is an absolute count, clamped to R.
* The low-rank size is clamped to R - r where that is smaller (ViT-B qkv at --rank 256 keeps 8 directions):
  X Y cannot have a rank above R - r, so the extra columns would be redundant parameters. The summary says
  where it clamps. The authors' code does not clamp: on ViT-B at rank 256 its SALT parts count 8.97 M,
  this file's 8.87 M.
* Regulariser weight 0 (the released config) rather than the paper's 0.01, which pulls every layer back
  toward W and held SALT back in our runs. MobileSAM, seed 0: JSRT's 5 classes, rank 4, Dice 0.932 at 0.01 and
  0.939 at 0; DRIVE, three seeds, 0.8132 and 0.8142. --reg-weight 0.01 restores the paper's.
* --rank 4 (the paper's small setting) with one class, 32 with several (the rule every method here shares).
  With the regulariser on, rank did nothing on JSRT (seed 0: 0.932 at 4, 0.933 at 32); without it, 32 gives
  0.945 against 0.939 at 4.
* Y = 0, so X Y = 0 and W~ = W at step 0: the model starts exactly as stock SAM (as the authors' SAM-2 file;
  their SAM-1 file starts X and Y at 0.01*randn, so its model moves before any training). X is drawn by
  torch's kaiming_uniform_ with a = sqrt(20) and its default leaky-ReLU gain sqrt(2/21): uniform in
  +-sqrt(6 / (21 * rank)), the fan-in being the rank (X is (R-r) x rank). The authors' SAM-2 file also
  passes a = sqrt(20), but its call uses the ReLU gain sqrt(2), with which a has no effect: a bound of
  sqrt(6 / rank), sqrt(21) = 4.6 times ours. With Y = 0 the bound does not change the start; it sets the
  size of Y's first gradients (X^T times the rest), so how fast the low-rank part moves at first.
* The layer computes W~ = W + U (ReLU(Sigma') - diag(s)) Vt: mathematically U ReLU(Sigma') Vt, but the
  change is exactly zero at step 0 (whatever the rounding of the SVD, and under bf16), so the start is
  bit-exact stock SAM.
* ReLU (--relu): "sigma" (default) applies it to the whole Sigma' matrix as the paper and its code do, so
  negative off-diagonal entries of X Y are cut to 0 (at any time roughly half of the off-diagonal block
  gets no gradient); this needs a dense (R-r) x (R-r) block per layer. "top" applies it to the scaled
  and shifted singular values only; X Y then enters unclipped, i.e. LoRA inside the residual singular
  subspace, and the rebuild stays low-rank. Both start at W~ = W; which one trains better is an experiment.
* U, s, Vt are computed in float64 on the model's device (after the pretrained weights are loaded: inject()
  runs after load_sam) and kept as float32 non-persistent buffers: they follow .to(device) and stay out of checkpoints.
* Training rebuilds W~ once per forward (one D x R x K matmul); evaluation caches W~ when the module enters
  eval mode (model.eval(), and after load_state_dict in eval mode); train() drops the cache. (So do not train
  in eval mode: the cached W~ carries no gradient.)
* --s-sam: r = R (all singular values scaled and shifted) and no X Y: W~ = U diag(ReLU(a*s + b)) Vt, the
  S-SAM layer; its regulariser is ours, ||a*s + b - s|| (S-SAM's code: ||1 - a|| + ||b||). We keep the rest
  of our recipe (norms + decoder train; S-SAM trains pos_embed instead of the decoder), so the comparison
  isolates the layer.
* Not trained here, unlike the authors' code: pos_embed (1 x 32 x 32 x 768 at their 512 input) and the
  text branch (this repository is prompt-free).

Run:  python salt.py --data drive --data-root path/to/DRIVE --split salt --rank 4
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import common


def parse_args(argv=None):
    p = cli.base_parser("SALT (singular-value scale and shift + low-rank residual update) on SAM's image "
                        "encoder, prompt-free; --s-sam gives the S-SAM baseline.")
    g = p.add_argument_group("SALT")
    g.add_argument("--rank", type=int, default=None,
                   help="size of the low-rank update X Y of the residual singular block (paper: 4 and 256; "
                        "default: 4, with several classes 32); clamped to R - r per layer where that is smaller")
    g.add_argument("--top-attn", type=float, default=0.99,
                   help="singular values scaled and shifted in attention qkv/proj: a fraction of R below 1 "
                        "(0.99: 760 of 768 on ViT-B, the authors' setting), a count from 1 up")
    g.add_argument("--top-mlp", type=float, default=0.065,
                   help="the same for the MLP layers (0.065: 50 of 768 on ViT-B, the authors' setting)")
    g.add_argument("--top-neck", type=float, default=0.977,
                   help="the same for the neck convolutions (0.977: 250 of 256, the authors' setting)")
    g.add_argument("--reg-weight", type=float, default=0.0,
                   help="weight of the regulariser ||a*s+b-s|| + ||XY||_F (default: 0, the authors' released "
                        "config; paper text: 0.01)")
    g.add_argument("--relu", default="sigma", choices=["sigma", "top"],
                   help="sigma: ReLU over the whole Sigma' (paper and code; cuts negative entries of XY); "
                        "top: ReLU on the scaled top singular values only, XY unclipped")
    g.add_argument("--s-sam", action="store_true",
                   help="S-SAM baseline: scale and shift ALL singular values, no low-rank part "
                        "(--rank and --top-* are ignored)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# The adapter (needs only torch and segment_anything: copy it from here to the end of inject).
# One mixin holds the SVD and the trainable parts; two subclasses of SAM's own layers use it.
# ----------------------------------------------------------------------------------------------------

class SALTMixin:
    """The SVD, the trainable parts and the weight rebuild, shared by SALTLinear and SALTConv2d.
    The frozen `weight` (and `bias`) stay under their SAM names; the rest is prefixed salt_."""

    def _init_salt(self, top, rank, relu):
        w = self.weight.detach()
        W = w.reshape(w.shape[0], -1)  # (D, K); conv (out, in, kh, kw) -> (out, in*kh*kw)
        D, K = W.shape
        R = min(D, K)
        self.top, self.rank, self.relu_mode = top, rank, relu  # r, low-rank size (0: none), ReLU rule
        # in float64 where the weight is (the GPU after load_sam), kept in float32: U diag(s) Vt = W to fp32 rounding
        U, s, Vt = torch.linalg.svd(W.double(), full_matrices=False)  # (D, R), (R,), (R, K)
        self.register_buffer("salt_U", U.float(), persistent=False)
        self.register_buffer("salt_S", s.float(), persistent=False)
        self.register_buffer("salt_Vt", Vt.float(), persistent=False)
        self.register_buffer("salt_cache", None, persistent=False)  # W~ while in eval mode
        self.salt_scale = nn.Parameter(torch.ones(top, device=w.device))  # a, (r,)
        self.salt_shift = nn.Parameter(torch.zeros(top, device=w.device))  # b, (r,)
        if rank > 0:
            self.salt_X = nn.Parameter(torch.empty(R - top, rank, device=w.device))
            self.salt_Y = nn.Parameter(torch.zeros(rank, R - top, device=w.device))  # Y = 0: X Y = 0 at step 0
            # a = sqrt(20) as the authors' SAM-2 file, with torch's leaky-ReLU gain (theirs: ReLU's, 4.6x wider)
            nn.init.kaiming_uniform_(self.salt_X, a=math.sqrt(20))
        self.register_load_state_dict_post_hook(SALTMixin._refresh_cache)

    def salt_delta(self):
        """W~ - W = U (ReLU(Sigma') - diag(s)) Vt as a (D, K) matrix; exactly 0 at initialisation."""
        r, U, s, Vt = self.top, self.salt_U, self.salt_S, self.salt_Vt
        d_top = F.relu(self.salt_scale * s[:r] + self.salt_shift) - s[:r]  # (r,) change of the top values
        left = U[:, :r] * d_top  # (D, r)
        if self.rank == 0:  # S-SAM, or r = R
            return left @ Vt[:r]
        if self.relu_mode == "sigma":  # ReLU on the whole residual block: dense (R-r) x (R-r)
            base = torch.diag(s[r:])
            block = F.relu(base + self.salt_X @ self.salt_Y) - base  # (R-r, R-r), 0 where X Y = 0
            return torch.cat([left, U[:, r:] @ block], 1) @ Vt  # (D, R) @ (R, K)
        # "top": the residual update stays rank-limited: U_rest X Y Vt_rest as a (D, rank) @ (rank, K) product
        return torch.cat([left, U[:, r:] @ self.salt_X], 1) @ torch.cat([Vt[:r], self.salt_Y @ Vt[r:]], 0)

    def adapted_weight(self):
        if self.salt_cache is not None:  # eval mode: W~ built once in train(False)
            return self.salt_cache
        return self.weight + self.salt_delta().view_as(self.weight)

    def salt_regulariser(self):
        """The paper's eq. 5 for this layer: ||a*s_top + b - s_top||_2 + ||X Y||_F (zero at initialisation)."""
        s = self.salt_S[:self.top]
        reg = torch.linalg.vector_norm(self.salt_scale * s + self.salt_shift - s)
        if self.rank > 0:
            reg = reg + torch.linalg.matrix_norm(self.salt_X @ self.salt_Y)
        return reg

    def train(self, mode=True):
        super().train(mode)
        with torch.no_grad():
            self.salt_cache = None if mode else self.weight + self.salt_delta().view_as(self.weight)
        return self

    @staticmethod
    def _refresh_cache(module, incompatible_keys):
        if not module.training:  # parameters loaded while in eval mode: rebuild the cached W~
            module.train(False)

    def extra_repr(self):
        return super().extra_repr() + f", salt_top={self.top}, salt_rank={self.rank}, relu={self.relu_mode}"


class SALTLinear(SALTMixin, nn.Linear):
    """A frozen nn.Linear whose weight is W~ = U ReLU(Sigma') Vt; `weight`/`bias` are SAM's, shared not copied."""

    def __init__(self, layer: nn.Linear, top, rank, relu="sigma"):
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        self.weight, self.bias = layer.weight, layer.bias
        self._init_salt(top, rank, relu)

    def forward(self, x):  # x (..., K): ViT (B, H, W, C) or windowed (B*nW, 14, 14, C); TinyViT (B*nW, ws*ws, C)
        return F.linear(x, self.adapted_weight(), self.bias)


class SALTConv2d(SALTMixin, nn.Conv2d):
    """A frozen nn.Conv2d (the neck's 1x1 and 3x3) whose kernel, flattened to out x in*kh*kw, is W~."""

    def __init__(self, layer: nn.Conv2d, top, rank, relu="sigma"):
        super().__init__(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
        self.weight, self.bias = layer.weight, layer.bias
        self._init_salt(top, rank, relu)

    def forward(self, x):  # x (B, C, S/16, S/16)
        return self._conv_forward(x, self.adapted_weight(), self.bias)


def salt_targets(encoder):
    """(kind, parent module, child name) of every layer SALT adapts, for SAM's ViT and MobileSAM's TinyViT."""
    if hasattr(encoder, "blocks"):  # SAM ViT: blocks.i.attn.{qkv,proj}, blocks.i.mlp.{lin1,lin2}
        blocks, mlp_names = list(encoder.blocks), ("lin1", "lin2")
    else:  # TinyViT: layers[0] is MBConv (convolutions only); layers[1:] hold attention blocks
        blocks, mlp_names = [b for layer in encoder.layers[1:] for b in layer.blocks], ("fc1", "fc2")
    out = []
    for blk in blocks:
        out += [("attn", blk.attn, "qkv"), ("attn", blk.attn, "proj")]
        out += [("mlp", blk.mlp, n) for n in mlp_names]
    # neck = Sequential(Conv1x1, LayerNorm2d, Conv3x3, LayerNorm2d) in both encoders
    out += [("neck", encoder.neck, "0"), ("neck", encoder.neck, "2")]
    return out


def top_count(value, R):
    """--top-* value -> r: a fraction of R (rounded) below 1, an absolute count from 1 up; clamped to R."""
    if value < 0 or (value >= 1 and value != int(value)):
        raise ValueError(f"--top-* value {value} is neither a fraction in [0, 1) nor a whole count; "
                        f"use e.g. 0.99 or 760.")
    return min(R, round(value * R) if value < 1 else int(value))


def inject(sam, args):
    """Replace the target layers of `sam` by SALT layers (SVD of the loaded weights), set what trains.
    `args`: rank, top_attn, top_mlp, top_neck, relu and s_sam, as the command line's."""
    if args.rank < 0 or (args.rank == 0 and not args.s_sam):
        raise ValueError(f"--rank {args.rank} must be at least 1 (or pass --s-sam for no low-rank part).")
    fractions = dict(attn=args.top_attn, mlp=args.top_mlp, neck=args.top_neck)
    summary = {}  # (layer kind, R, top, rank) -> layers
    for kind, parent, name in salt_targets(sam.image_encoder):
        layer = getattr(parent, name)
        R = min(layer.weight.shape[0], layer.weight[0].numel())
        top = R if args.s_sam else top_count(fractions[kind], R)
        rank = 0 if args.s_sam else min(args.rank, R - top)
        cls = SALTConv2d if isinstance(layer, nn.Conv2d) else SALTLinear
        setattr(parent, name, cls(layer, top, rank, args.relu))
        key = (f"{kind}.{name}", R, top, rank)
        summary[key] = summary.get(key, 0) + 1
    for pname, p in sam.named_parameters():
        p.requires_grad = "salt_" in pname
    for pname, p in sam.image_encoder.named_parameters():
        # the paper's rule: every "norm" parameter of the encoder; TinyViT's norm_head belongs to its unused
        # classification head (not in SAM's forward), so it stays frozen
        if "norm" in pname and not pname.startswith("norm_head"):
            p.requires_grad = True
    sam.mask_decoder.requires_grad_(True)  # as lora.py (SAMed)
    sam.prompt_encoder.no_mask_embed.requires_grad_(True)

    lines = []
    for (kind, R, top, rank), n in summary.items():
        line = f"  {n:2d} x {kind:10s} R {R:4d}: top {top:4d} scaled+shifted"
        if not args.s_sam:
            line += f", rank-{rank} XY on the other {R - top}"
            if rank < args.rank:
                line += f" (--rank {args.rank} clamped to R - r)"
        lines.append(line)
    mode = "S-SAM (all singular values, no low-rank part)" if args.s_sam else f"SALT rank {args.rank}, ReLU {args.relu}"
    print(f"{mode} on {sum(summary.values())} layers:\n" + "\n".join(lines))
    return [dict(layer=k[0], R=k[1], top=k[2], rank=k[3], count=n) for k, n in summary.items()]


def salt_layers(model):
    return [m for m in model.modules() if isinstance(m, SALTMixin)]


def salt_parameter_count(model):
    """The formula the tests check: 2r + 2(R - r)*rank per SALT layer."""
    return sum(2 * m.top + 2 * (m.salt_S.numel() - m.top) * m.rank for m in salt_layers(model))


# ----------------------------------------------------------------------------------------------------
# The extra loss
# ----------------------------------------------------------------------------------------------------

def salt_regulariser(model):
    """Sum over SALT layers of the paper's eq. 5: ||a*s + b - s|| + ||X Y||_F."""
    return sum(m.salt_regulariser() for m in salt_layers(model))


def make_loss(reg_weight):
    def loss_fn(model, images, masks):
        loss = common.segmentation_loss(model(images), masks)
        if reg_weight > 0:
            loss = loss + reg_weight * salt_regulariser(model)
        return loss
    return loss_fn


def merged_state_dict(model):
    """SAM's own state dict with W~ = W + U (ReLU(Sigma') - diag s) Vt in place of each adapted weight and
    the trained norms and decoder as they are (for --export-merged); SVD factors and SALT parameters dropped."""
    state = {k: v for k, v in model.state_dict().items() if ".salt_" not in k}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, SALTMixin):
                state[f"{name}.weight"] = module.weight + module.salt_delta().view_as(module.weight)
    return state


def main(argv=None):
    args = parse_args(argv)
    if args.run_name is None:  # tell S-SAM and runs at an explicit --rank apart
        label = "ssam" if args.s_sam else "salt" if args.rank is None else f"salt_r{args.rank}"
        args.run_name = f"{label}_{args.data}_{args.model}_s{args.seed}"
    summary = []  # inject's per-layer-type summary, for metrics.json
    return cli.main(args, "salt", inject=lambda model: summary.extend(inject(model, args)),
                       loss_fn=make_loss(args.reg_weight), merge=merged_state_dict,
                       describe=lambda model: dict(salt_layers=summary, salt_params=salt_parameter_count(model)))


if __name__ == "__main__":
    cli.main_guard(main)
