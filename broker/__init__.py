"""The hub side: embedded amqtt broker and the coordinator."""
