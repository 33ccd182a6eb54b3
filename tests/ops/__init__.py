"""Operations (app/ops): recover, rebuild-from-storage, replay, export/import transfer, gc."""
