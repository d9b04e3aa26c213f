"""Inference-only rewrites of a traced model (`torch.fx.GraphModule`): the same function, less work.

- `use_bits_relus`: ReLUs that compute on a bf16 tensor's bits (`BitsReLU`).
- `fold_normalization`: Normalize folded into the first conv, so the model takes raw pixels
  (`NormalizedInputConv`).
- `fold_normalization_for_uint8`: the same for a model exported for int8, which takes uint8
  pixels and pads them with the mean pixel (`MeanPaddedPixelConv`).
Each changes the graph module's own containers only: a model it was traced from keeps its layers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.core.device import mean_pixel, pixel_normalization


class BitsReLU(nn.ReLU):
    """ReLU with the same values, computed on a bf16 tensor's bits as int16.

    Read as int16, a bf16 value is at most -128 exactly when it is negative or -inf (sign bit
    set, not a NaN), so threshold(bits, -128, 0) zeroes those and keeps the rest, NaNs
    included (-0.0 comes out +0.0). torch's bf16 elementwise kernels on CPU are several times
    slower than its int16 ones, and ReLU is a large share of a ResNet's time. Other dtypes, and
    a model being compiled (inductor fuses a plain ReLU into the conv), get torch.relu.
    """

    def forward(self, x):
        if x.dtype != torch.bfloat16 or torch.compiler.is_compiling():
            return super().forward(x)
        bits = x.view(torch.int16)
        bits = torch.threshold_(bits, -128, 0) if self.inplace else torch.threshold(bits, -128, 0)
        return bits.view(torch.bfloat16)


def use_bits_relus(model):
    """Every nn.ReLU of a graph module replaced by a BitsReLU (for bf16 on a CPU)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.ReLU:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, BitsReLU(module.inplace))


class Fp32Head(nn.Module):
    """The classification head in fp32 under bf16/fp16 autocast. Its weights carry the calibration
    temperature (W / T), which low precision would round differently from W: near-ties would
    flip between training's validation (before calibration) and evaluate (after). In fp32 the
    head is exactly as decisive either way; it is a tiny share of the work."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.linear(x.float())


def use_fp32_head(model):
    """Wrap the model's last Linear layer (its head) in Fp32Head; False if it has none."""
    name = next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)
    if name is None:
        return False
    model.set_submodule(name, Fp32Head(model.get_submodule(name)))
    return True


def fold_into_conv(conv, mean, std):
    """Normalize(x / 255) = x * a + s per channel (a = 1 / (255 std), s = -mean / std) folded into
    `conv`: (W and s in float64, conv(W, s) per output channel, weight W * a and bias b + conv(W, s)
    as frozen parameters in the conv's dtype)."""
    w = conv.weight.detach().double()
    scale, shift = pixel_normalization(mean, std, torch.float64)
    inside = (w * shift).sum((1, 2, 3))
    bias = conv.bias.detach().double() if conv.bias is not None else 0
    frozen = lambda t: nn.Parameter(t.to(conv.weight.dtype), requires_grad=False)  # noqa: E731
    return w, shift, inside, frozen(w * scale), frozen(bias + inside)


class NormalizedInputConv(nn.Module):
    """conv(Normalize(x / 255)) for raw pixel values x (0..255), with Normalize folded in.

    Normalize is x * a + s per channel (a = 1 / (255 std), s = -mean / std), so the conv of it
    is conv(W * a, x) plus the conv of the constant image s. Inside the image that constant is
    the same everywhere and joins the bias; near the edges the kernel also covers zero padding
    (zeros of the normalised image, where the shift is missing), so those output rows and
    columns get their own correction, computed once. The same function in exact arithmetic
    (fp32: within 2e-6 of conv-after-Normalize), and the batch needs no normalising pass.
    """

    def __init__(self, conv, mean, std, image_size):
        super().__init__()
        # float64 W and s kept for corrections at other input sizes; `inside` is the shift's
        # contribution where no padding is covered
        self.w, self.shift, self.inside, self.weight, self.bias = fold_into_conv(conv, mean, std)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.kernel_size = conv.kernel_size
        self.size = (image_size, image_size)
        self.register_buffer("edges", self.edge_correction(*self.size))

    def edge_correction(self, height, width):
        """What the output misses near the edges: conv(W, s) where the kernel covers padding,
        zero elsewhere (exactly: only the edge strips of it are ever added)."""
        constant = self.shift.expand(1, -1, height, width)
        full = F.conv2d(constant, self.w, None, self.stride, self.padding, self.dilation)
        return (full - self.inside.view(1, -1, 1, 1)).float()

    def edge_rows(self, out_size, in_size, dim):
        """(first row after the top strip, first row of the bottom strip) along one dimension."""
        k, s, p, d = self.kernel_size[dim], self.stride[dim], self.padding[dim], self.dilation[dim]
        top = min(out_size, -(-p // s))  # rows whose kernel starts above the image
        bottom = -(-(in_size + p - (k - 1) * d) // s)  # first row whose kernel ends below it
        return top, max(top, min(out_size, bottom))

    def forward(self, x):
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        edges = self.edges if tuple(x.shape[2:]) == self.size else self.edge_correction(*x.shape[2:]).to(y.device)
        edges = edges.to(y.dtype)
        top, bottom = self.edge_rows(y.shape[2], x.shape[2], 0)
        left, right = self.edge_rows(y.shape[3], x.shape[3], 1)
        y[:, :, :top] += edges[:, :, :top]
        y[:, :, bottom:] += edges[:, :, bottom:]
        y[:, :, top:bottom, :left] += edges[:, :, top:bottom, :left]
        y[:, :, top:bottom, right:] += edges[:, :, top:bottom, right:]
        return y


class MeanPaddedPixelConv(nn.Module):
    """conv(Normalize(x / 255)) for uint8 pixels x, as a graph that int8 quantisation keeps exact.

    The weights and bias fold Normalize in as in NormalizedInputConv; the zero padding of the
    normalised image is the mean pixel of the raw one, so the pixels are padded with it (rounded to
    an integer: within half a level, at the border only) and the conv pads nothing. Quantised, the
    uint8 pixels are then their own int8 activations (scale 1, zero point 0): nothing is normalised,
    cast or rounded before the first conv (`src.shipping.onnx_export.quantize_int8`).
    """

    def __init__(self, conv, mean, std):
        super().__init__()
        *_, self.weight, self.bias = fold_into_conv(conv, mean, std)
        self.mean_pixel = mean_pixel(mean)
        (top, left), self.stride, self.dilation = conv.padding, conv.stride, conv.dilation
        self.padding = (left, left, top, top)

    def forward(self, x):
        """uint8 N x 3 x H x W in; each channel padded with its own value (F.pad takes one)."""
        x = torch.cat([F.pad(x[:, c:c + 1], self.padding, value=v) for c, v in enumerate(self.mean_pixel)], 1)
        return F.conv2d(x.to(self.weight.dtype), self.weight, self.bias, self.stride, 0, self.dilation)


def replace_input_conv(model, make):
    """Replace the first layer of a graph module by make(conv) when that layer is a plain conv
    (zero padding, no groups, 3 input channels) and the only user of the input; True when it did."""
    if not isinstance(model, torch.fx.GraphModule):
        return False
    inputs = [node for node in model.graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        return False
    first = next(iter(inputs[0].users))
    conv = model.get_submodule(first.target) if first.op == "call_module" else None
    if (type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str) or conv.in_channels != 3):
        return False
    folded = make(conv)
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
        folded = folded.to(memory_format=torch.channels_last)
    parent, _, attr = first.target.rpartition(".")
    setattr(model.get_submodule(parent), attr, folded)
    return True


def fold_normalization(model, mean, std, image_size):
    """Fold Normalize(mean, std) into the first layer of a graph module (see replace_input_conv);
    True when it did. The model then takes raw pixel values (uint8 batches as floats)."""
    return replace_input_conv(model, lambda conv: NormalizedInputConv(conv, mean, std, image_size))


def fold_normalization_for_uint8(model, mean, std):
    """The same for int8 export: the model then takes uint8 pixels (`MeanPaddedPixelConv`)."""
    return replace_input_conv(model, lambda conv: MeanPaddedPixelConv(conv, mean, std))
