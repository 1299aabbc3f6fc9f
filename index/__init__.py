"""The vector side of deepfeat: FAISS vectors, the SQLite catalog, the manifest, the ImageStore facade.

Knows faiss, sqlite3, numpy and the filesystem; never imports torch, ``models`` or ``app``.
"""
