{
  "targets": [
    {
      "target_name": "qlayer_seek",
      "sources": ["seek.c", "clone.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
