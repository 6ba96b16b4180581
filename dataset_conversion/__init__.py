"""Converters from public dataset releases (ISIC, Stroke2021) to nnU-Net raw format (installed as
``nndiffseg.dataset_conversion``)."""
