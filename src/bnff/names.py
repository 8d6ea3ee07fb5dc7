"""The names the command line offers (models, backends, bench variants, plan schemes, augmentations), importable without torch,
so that ``bnff --help`` answers at once. The packages that implement them build their tables from
these tuples."""

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "densenet169", "densenet201",
               "inception_v3", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
               "regnet_y_1_6gf", "cspdarknet53")
BACKEND_NAMES = ("cpu", "reference", "triton")
BENCH_VARIANTS = ("eager", "compile", "bnff", "bnff+compile", "conv_floor", "bnff_libxsmm")
"""``bnff bench``'s variants; ``bnff_libxsmm`` (bnff with its pointwise groups' 1x1 convolutions on libxsmm,
unfused: ``BNFF_POINTWISE=libxsmm``) only when asked for."""
DEFAULT_BENCH_VARIANTS = BENCH_VARIANTS[:5]
SCHEMES = ("unfused", "bnff", "bnff_pw", "fused")
"""The execution schemes of the fusion plan (``bnff.plan.schemes`` builds each group's steps under each)."""
AUGMENTATIONS = ("auto", "none", "crop", "crop-flip")
"""Choices of ``bnff train --augment`` (``bnff.data.augment``). ``auto``: ``crop`` for the digits
(a mirrored digit is another glyph), ``crop-flip`` for CIFAR-10 and image folders."""


class UsageError(ValueError):
    """Input the user can fix (a missing option, an unreadable data file): the CLI prints the message
    and exits with status 2; any other exception is a bug and keeps its traceback."""
