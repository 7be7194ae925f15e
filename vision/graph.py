"""The embedder graph's contract, shared by the exporters (``offline.training``) and the runtime.

Input ``input`` float32 (N, 3, H, W), dynamic batch, height and width (multiples of 32); outputs
``features`` (N, C, H/32, W/32) for saliency localization, ``embedding`` (N, dim) pooled and
L2-normalised, and in fine-tuned models ``coarse_logits`` (N, classes), the classifier head whose
class names are the registry entry's ``classes["coarse"]``.
"""

OPSET = 17
INPUT_NAME = "input"
OUTPUT_FEATURES = "features"
OUTPUT_EMBEDDING = "embedding"
OUTPUT_COARSE = "coarse_logits"
