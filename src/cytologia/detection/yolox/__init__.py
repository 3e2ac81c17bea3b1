"""YOLOX, a single-class anchor-free detector written in this project (Apache-2.0, no ultralytics, no YOLOX package).

Modules: :mod:`~cytologia.detection.yolox.model` (CSPDarknet, PAFPN, decoupled head, decoding; official weight layout),
:mod:`~cytologia.detection.yolox.assign` (SimOTA), :mod:`~cytologia.detection.yolox.losses` (IoU/GIoU, objectness,
class, L1), :mod:`~cytologia.detection.yolox.augment` (mosaic, mixup, affine, flips, HSV),
:mod:`~cytologia.detection.yolox.train` (schedule, EMA, multi-scale, selection on the box term),
:mod:`~cytologia.detection.yolox.checkpoint`, :mod:`~cytologia.detection.yolox.infer` (NMS),
:mod:`~cytologia.detection.yolox.export` (ONNX with decoding) and :mod:`~cytologia.detection.yolox.backend`, the
registry entry ``yolox`` (``create_detector("yolox", "yolox_s")``), which implements
:class:`cytologia.detection.base.Detector`: letterbox, batches, box mapping and the ONNX parity check are shared.
"""
