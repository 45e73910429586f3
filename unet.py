"""A plain 2-D U-Net, trained from scratch: the baseline every PEFT method here has to beat.

Paper: Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015 (arXiv 1505.04597). SALT's table and the field's multi-class benchmarks carry a U-Net row; a
method that fine-tunes a 10 M-parameter foundation model is only worth its cost where it beats one.

What the network is, in the order of this file:
1. Encoder: five levels of two 3x3 convolutions (each with BatchNorm and ReLU), 2x2 max-pooling between
   them; widths w, 2w, 4w, 8w, 16w (--width 32: 32 ... 512 channels).
2. Decoder: four levels, each a 2x2 transposed convolution (up x2, halving the width), concatenated with the
   encoder's feature map of that size (the skip connection), then two 3x3 convolutions.
3. A 1x1 convolution to background + one logit per class, at the input's full resolution.
       (B, 3, S, S) -> (B, C + 1, S, S)
With --width 32 that is 7.8 M parameters, all trained.

It trains by the same loop, data, loss (0.2 CE + 0.8 foreground Dice), augmentation, schedule and
metrics as the SAM methods (cli.main with a `build` of its own), so its row in a table differs from theirs
by the network alone. Differences from the paper's recipe:
  what            U-Net (2015)                                 this file
  convolutions    unpadded (output smaller than the input)     padded ("same"): output = input size
  normalisation   none                                         BatchNorm after every 3x3 convolution
  widths          64 ... 1024                                  32 ... 512 (--width; 4x fewer parameters)
  loss            pixel-weighted cross-entropy                 the loss every method here uses
  optimiser       SGD, momentum 0.99, batch 1                  AdamW, 1e-3, batch 8, warm-up + poly decay
  augmentation    elastic deformations, shifts, rotations      flip, rotation +-10 deg, brightness (SALT's)
  input           one tile of a large image                    the whole image at --img-size (512), or crops of
                                                               1/zoom of it (--zoom; default 1: whole images)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from data import UserError


def parse_args(argv=None):
    p = cli.base_parser("A plain 2-D U-Net from scratch: the baseline for the PEFT methods.")
    p.add_argument("--width", type=int, default=32, help="channels of the first level (doubled at each of 4 levels)")
    # The U-Net's output has its input's resolution (SAM's a quarter of it): 512 covers DRIVE's 584 x 565 as
    # finely as SAM at 1024 with zoom 2 does, and JSRT's 512 x 512 whole. No pretrained weights, no SAM.
    # 1e-3 for any number of classes: JSRT at 3e-3 gave 0.932 against 0.942 (seed 0).
    p.set_defaults(model="unet", img_size=512, zoom=1, checkpoint="none", lr=1e-3)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# The network (needs only torch)
# ----------------------------------------------------------------------------------------------------

def double_conv(c_in, c_out):
    """Two 3x3 convolutions, each with BatchNorm and ReLU: (B, c_in, H, W) -> (B, c_out, H, W)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Image (B, 3, S, S) in [0, 1] -> logits (B, num_classes + 1, S, S); S a multiple of 16 (four poolings)."""

    def __init__(self, num_classes, img_size, width=32, levels=4):
        super().__init__()
        widths = [width * 2 ** i for i in range(levels + 1)]  # 32, 64, 128, 256, 512
        self.down = nn.ModuleList([double_conv(3, widths[0])] +
                                  [double_conv(widths[i], widths[i + 1]) for i in range(levels)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(levels))])
        self.fuse = nn.ModuleList([double_conv(2 * widths[i], widths[i]) for i in reversed(range(levels))])
        self.head = nn.Conv2d(widths[0], num_classes + 1, 1)
        self.name, self.img_size, self.num_classes = "unet", img_size, num_classes
        # the same input normalisation as SAM's (ImageNet statistics of 0-255 RGB)
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1) / 255, False)
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1) / 255, False)
        self.base_keys = set()  # nothing comes from a pretrained model: every weight is in the checkpoints

    def forward(self, images):
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        skips = []
        for i, level in enumerate(self.down):
            x = level(x if i == 0 else F.max_pool2d(x, 2))  # (B, widths[i], S / 2^i, S / 2^i)
            skips.append(x)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips[:-1])):
            x = fuse(torch.cat([up(x), skip], 1))  # up: half the width, twice the side; then the skip joins
        return self.head(x)  # (B, C + 1, S, S)


def build(args, device):
    if args.model != "unet" or args.checkpoint != "none":
        raise UserError("unet.py trains a U-Net from scratch: --model and --checkpoint do not apply; leave them out.")
    if args.img_size % 16:
        raise UserError(f"--img-size {args.img_size} is not a multiple of 16 (the U-Net pools four times); "
                               f"use e.g. 512.")
    if args.width < 1:
        raise UserError(f"--width {args.width} must be at least 1, e.g. 32.")
    return UNet(args.num_classes, args.img_size, args.width).to(device)


def main(argv=None):
    args = parse_args(argv)
    return cli.main(args, "unet", build=build)


if __name__ == "__main__":
    cli.main_guard(main)
