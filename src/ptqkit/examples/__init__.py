"""Runnable examples shipped with ptqkit."""
