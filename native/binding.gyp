{
  "targets": [
    {
      "target_name": "qlayer_seek",
      "sources": ["seek.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
