"""Cross-scale parametric knowledge transfer (after Tan et al., "Neural Incompatibility", ACL
2025): PostPKT (``postpkt``: Zhong et al., "Seeking Neural Nuggets", ICLR 2024) and LaTen
(``laten``: locate, align through a small hypernetwork, inject), with their controls, run and
written by ``engine.transfer.run.transfer``."""

METHODS = ("postpkt", "laten", "postpkt_control", "laten_control")
