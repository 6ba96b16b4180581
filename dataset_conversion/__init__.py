"""Converters from public dataset releases to nnU-Net raw format (installed as ``nndiffseg.dataset_conversion``)."""
