"""The collaborative learning protocol (distributed selective SGD, Shokri & Shmatikov 2015), in which
Hitaj et al. run their GAN attack: what participants agree on (``config``), what they upload
(``upload``, ``sparse_vector`` for the differentially private upload) and the rounds themselves
(``protocol``)."""
from .config import OPTIMIZERS, ORDERS, UPLOAD_CRITERIA, ProtocolConfig
from .protocol import (
    CollaborativeLearning, ParameterServer, Participant, ProtocolResult, RoundRecord, make_uploader, run_protocol,
    split_by_labels, split_labels,
)
from .sparse_vector import SparseVectorScales, sparse_vector_privacy, sparse_vector_scales, sparse_vector_upload
from .upload import fraction_count, select_upload, upload_count

__all__ = [
    "ORDERS", "OPTIMIZERS", "UPLOAD_CRITERIA", "ProtocolConfig", "CollaborativeLearning", "ParameterServer",
    "Participant", "ProtocolResult", "RoundRecord", "make_uploader", "run_protocol", "split_by_labels",
    "split_labels", "SparseVectorScales", "sparse_vector_privacy", "sparse_vector_scales", "sparse_vector_upload",
    "fraction_count", "select_upload", "upload_count",
]
