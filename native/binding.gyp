{
  "targets": [
    {
      "target_name": "qlayer_seek",
      "sources": ["seek.c", "clone.c", "locks.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
