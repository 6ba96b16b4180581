"""Converters from public dataset releases (ISIC, Stroke2021, multi-rater QUBIQ and LIDC) to nnU-Net raw format
(installed as ``nndiffseg.dataset_conversion``)."""
